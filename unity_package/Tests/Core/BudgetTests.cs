using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Net;
using System.Threading;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>
    /// The GPU budget through the client against real daemons: set_budget answered and in force
    /// (the daemon's /healthz gpu_budget), frames counted by the daemon, the budget ending with its
    /// connection and going out again after the daemon restarts, bad values refused before sending.
    /// </summary>
    [TestFixture]
    public class BudgetTests
    {
        /// <summary>The daemon's /healthz gpu_budget (on the WebSocket's port).</summary>
        internal static Dictionary<string, object> GpuBudget(string wsUrl)
        {
            var uri = new Uri(wsUrl);
            using (var web = new WebClient())
            {
                string body = web.DownloadString("http://" + uri.Host + ":" + uri.Port + "/healthz");
                var health = (Dictionary<string, object>)Json.Parse(body);
                return (Dictionary<string, object>)health["gpu_budget"];
            }
        }

        static double Number(Dictionary<string, object> map, string key)
        {
            Assert.IsTrue(map.ContainsKey(key) && map[key] != null, "no '" + key + "' in " + Json.Write(map));
            return Convert.ToDouble(map[key]);
        }

        static bool Eventually(Func<bool> condition)
        {
            var clock = Stopwatch.StartNew();
            while (clock.Elapsed < TestEnv.Patience)
            {
                if (condition()) return true;
                Thread.Sleep(20);
            }
            return false;
        }

        static SetBudget Full()
        {
            return new SetBudget
            {
                DutyCap = 0.5,
                TokensPerS = new TokenRates { Player = 200, Background = 20 },
                FrameSync = new FrameSync { PeriodMs = 16.7, GameMs = 8, MarginMs = 1, OverlapMs = 0.75 },
                MaxStepMs = 4,
            };
        }

        [Test]
        public void ABudgetIsAnsweredKeptAndInForceUntilLifted()
        {
            using (LoraloomClient client = TestEnv.Await(LoraloomClient.ConnectAsync(TestEnv.Url, TestEnv.Token)))
            {
                var applied = new List<Budget>();
                client.BudgetApplied += b => { lock (applied) applied.Add(b); };
                SetBudget asked = Full();
                Budget reply = TestEnv.Await(client.SetBudgetAsync(asked));
                Assert.IsTrue(reply.SetByClient);
                Assert.AreEqual(0.5, reply.DutyCap);
                Assert.AreEqual(200.0, reply.TokensPerS.Player);
                Assert.IsNull(reply.TokensPerS.Normal);
                Assert.AreEqual(20.0, reply.TokensPerS.Background);
                Assert.AreEqual(16.7, reply.FrameSync.PeriodMs);
                Assert.AreEqual(8.0, reply.FrameSync.GameMs);
                Assert.AreEqual(1.0, reply.FrameSync.MarginMs);
                Assert.AreEqual(0.75, reply.FrameSync.OverlapMs);
                Assert.AreEqual(4.0, reply.MaxStepMs);
                lock (applied) CollectionAssert.AreEqual(new[] { reply }, applied);

                Dictionary<string, object> health = GpuBudget(TestEnv.Url);
                Assert.AreEqual(true, health["active"]);
                Assert.AreEqual(true, health["set_by_client"]);
                Assert.AreEqual(0.5, Number(health, "duty_cap"));
                Assert.AreEqual(4.0, Number(health, "max_step_ms"));
                var rates = (Dictionary<string, object>)health["tokens_per_s"];
                CollectionAssert.AreEquivalent(new[] { "player", "background" }, rates.Keys);
                Assert.AreEqual(200.0, Number(rates, "player"));
                var sync = (Dictionary<string, object>)health["frame_sync"];
                Assert.AreEqual(16.7, Number(sync, "period_ms"));
                Assert.AreEqual(8.0, Number(sync, "game_ms"));
                Assert.AreEqual(0.75, Number(sync, "overlap_ms"));

                // The kept copy is the client's own: changing the caller's object changes nothing.
                asked.DutyCap = 0.9;
                asked.FrameSync.GameMs = 1;
                SetBudget kept = client.KeptBudget;
                Assert.AreEqual(0.5, kept.DutyCap);
                Assert.AreEqual(8.0, kept.FrameSync.GameMs);

                // A line still runs under the budget.
                Generate line = new Generate { Prompt = "Under budget", MaxTokens = 8, Temperature = 0.0 };
                Assert.Greater(TestEnv.Await(client.GenerateAsync(line)).CompletionTokens, 0);

                Budget lifted = TestEnv.Await(client.SetBudgetAsync(null));
                Assert.IsFalse(lifted.SetByClient);
                Assert.IsNull(lifted.DutyCap);
                Assert.IsNull(client.KeptBudget, "nothing to send again on a new connection");
                Assert.AreEqual(false, GpuBudget(TestEnv.Url)["active"]);
            }
        }

        [Test]
        public void FramesReportedAreCountedByTheDaemon()
        {
            using (LoraloomClient client = TestEnv.Await(LoraloomClient.ConnectAsync(TestEnv.Url, TestEnv.Token)))
            {
                TestEnv.Await(client.SetBudgetAsync(new SetBudget { FrameSync = new FrameSync { PeriodMs = 8.3, GameMs = 3.5 } }));
                long before = Convert.ToInt64(GpuBudget(TestEnv.Url)["frames"]);
                const int frames = 120;
                int reported = 0;
                var clock = Stopwatch.StartNew();
                while (reported < frames && clock.Elapsed < TestEnv.Patience)
                {
                    if (client.ReportFrame()) reported++;
                    Thread.Sleep(2); // a fast game; a frame whose previous message is still going out is skipped
                }
                Assert.AreEqual(frames, reported);
                Assert.IsTrue(Eventually(() => client.FramesSent == frames), "sent: " + client.FramesSent);
                Assert.IsTrue(Eventually(() => Convert.ToInt64(GpuBudget(TestEnv.Url)["frames"]) - before == frames),
                    "the daemon counted " + (Convert.ToInt64(GpuBudget(TestEnv.Url)["frames"]) - before) + " of " + frames);
                TestEnv.Await(client.SetBudgetAsync(null));
            }
        }

        /// <summary>Reports <paramref name="frames"/> frames with <paramref name="gameGpuMs"/>; waits until the daemon counted them all.</summary>
        static void ReportFrames(LoraloomClient client, int frames, double? gameGpuMs)
        {
            long counted = Convert.ToInt64(GpuBudget(TestEnv.Url)["frames"]);
            long sent = client.FramesSent;
            int reported = 0;
            var clock = Stopwatch.StartNew();
            while (reported < frames && clock.Elapsed < TestEnv.Patience)
            {
                if (client.ReportFrame(gameGpuMs)) reported++;
                Thread.Sleep(2);
            }
            Assert.AreEqual(frames, reported);
            Assert.IsTrue(Eventually(() => client.FramesSent - sent == frames), "sent: " + (client.FramesSent - sent));
            // A frame the daemon refused (a game_ms out of its range) would be answered with an error, not counted.
            Assert.IsTrue(Eventually(() => Convert.ToInt64(GpuBudget(TestEnv.Url)["frames"]) - counted == frames),
                "the daemon counted " + (Convert.ToInt64(GpuBudget(TestEnv.Url)["frames"]) - counted) + " of " + frames);
        }

        [Test]
        public void MeasuredGameTimesSizeTheGamesPartAndBadOnesAreLeftOut()
        {
            using (LoraloomClient client = TestEnv.Await(LoraloomClient.ConnectAsync(TestEnv.Url, TestEnv.Token)))
            {
                var sync = new SetBudget { FrameSync = new FrameSync { PeriodMs = 8.3, GameMs = 3.5 } };
                TestEnv.Await(client.SetBudgetAsync(sync));
                Assert.AreEqual(3.5, Number(GpuBudget(TestEnv.Url), "game_ms_in_use"), "no reports yet: FrameSync.GameMs");

                // NaN, negative, above 1000: the frames go out without a time, and the static part stays.
                foreach (double bad in new[] { double.NaN, -1.0, 5000.0, double.PositiveInfinity })
                    ReportFrames(client, 3, bad);
                Assert.AreEqual(3.5, Number(GpuBudget(TestEnv.Url), "game_ms_in_use"), "bad values are not sent");

                ReportFrames(client, 6, 2.0);
                Assert.AreEqual(2.0, Number(GpuBudget(TestEnv.Url), "game_ms_in_use"), "the measured times' part");

                // A new budget starts over; a frame without a time (the no-argument overload) adds no report.
                TestEnv.Await(client.SetBudgetAsync(sync));
                Assert.AreEqual(3.5, Number(GpuBudget(TestEnv.Url), "game_ms_in_use"));
                long counted = Convert.ToInt64(GpuBudget(TestEnv.Url)["frames"]);
                for (int i = 0; i < 6; i++)
                {
                    Assert.IsTrue(Eventually(() => client.ReportFrame()), "frame " + i);
                }
                Assert.IsTrue(Eventually(() => Convert.ToInt64(GpuBudget(TestEnv.Url)["frames"]) - counted == 6));
                Assert.AreEqual(3.5, Number(GpuBudget(TestEnv.Url), "game_ms_in_use"));
                ReportFrames(client, 4, 0.0);
                Assert.AreEqual(0.0, Number(GpuBudget(TestEnv.Url), "game_ms_in_use"), "0 ms is in range: sent");
                TestEnv.Await(client.SetBudgetAsync(null));
            }
        }

        [Test]
        public void ABudgetEndsWithItsConnection()
        {
            LoraloomClient client = TestEnv.Await(LoraloomClient.ConnectAsync(TestEnv.Url, TestEnv.Token));
            TestEnv.Await(client.SetBudgetAsync(new SetBudget { DutyCap = 0.3 }));
            Assert.AreEqual(true, GpuBudget(TestEnv.Url)["set_by_client"]);
            TestEnv.Run(() => client.CloseAsync());
            Assert.IsTrue(Eventually(() => false.Equals(GpuBudget(TestEnv.Url)["set_by_client"])), "the daemon's own budget again");
            Assert.IsFalse(client.ReportFrame(), "a closed client reports no frame");
        }

        [Test]
        public void OutOfRangeValuesAreRefusedBeforeAnythingIsSent()
        {
            using (LoraloomClient client = TestEnv.Await(LoraloomClient.ConnectAsync(TestEnv.Url, TestEnv.Token)))
            {
                TestEnv.Await(client.SetBudgetAsync(new SetBudget { DutyCap = 0.6 }));
                Assert.Throws<ArgumentOutOfRangeException>(() => client.SetBudgetAsync(new SetBudget { DutyCap = 1.5 }).GetAwaiter().GetResult());
                Assert.Throws<ArgumentOutOfRangeException>(() => client.SetBudgetAsync(new SetBudget { DutyCap = 0 }).GetAwaiter().GetResult());
                Assert.Throws<ArgumentOutOfRangeException>(() => client.SetBudgetAsync(new SetBudget
                {
                    FrameSync = new FrameSync { PeriodMs = 0.5, GameMs = 0 },
                }).GetAwaiter().GetResult());
                Assert.Throws<ArgumentOutOfRangeException>(() => client.SetBudgetAsync(new SetBudget
                {
                    TokensPerS = new TokenRates { Normal = -1 },
                }).GetAwaiter().GetResult());
                Assert.AreEqual(0.6, client.KeptBudget.DutyCap);
                Assert.AreEqual(0.6, Number(GpuBudget(TestEnv.Url), "duty_cap"), "the budget in force is unchanged");
                TestEnv.Await(client.SetBudgetAsync(null));
            }
        }

        [Test]
        public void TheKeptBudgetGoesOutAgainAfterTheDaemonRestarts()
        {
            string runtimeFile = Path.Combine(TestEnv.TempDir(), "daemon.json");
            var options = new LoraloomClientOptions
            {
                RuntimeFile = runtimeFile,
                ReconnectMinDelay = TimeSpan.FromMilliseconds(100),
                ReconnectMaxDelay = TimeSpan.FromMilliseconds(500),
            };
            var applied = new List<Budget>();
            int reconnected = 0;
            using (DaemonLauncher first = LiveDaemonLauncher(runtimeFile))
            {
                TestEnv.Await(first.EnsureRunningAsync(), TimeSpan.FromSeconds(120));
                using (LoraloomClient client = TestEnv.Await(LoraloomClient.ConnectAsync(options)))
                {
                    client.BudgetApplied += b => { lock (applied) applied.Add(b); };
                    client.Reconnected += w => Interlocked.Increment(ref reconnected);
                    TestEnv.Await(client.SetBudgetAsync(new SetBudget { DutyCap = 0.25, TokensPerS = new TokenRates { Normal = 50 } }));
                    first.Stop();
                    using (DaemonLauncher second = LiveDaemonLauncher(runtimeFile))
                    {
                        RuntimeInfo info = TestEnv.Await(second.EnsureRunningAsync(), TimeSpan.FromSeconds(120));
                        Assert.IsTrue(Eventually(() => reconnected == 1), "reconnected");
                        Assert.IsTrue(Eventually(() => { lock (applied) return applied.Count == 2; }), "applied again on the new connection");
                        Dictionary<string, object> health = GpuBudget(info.Url);
                        Assert.AreEqual(true, health["set_by_client"], "the new daemon has the game's budget without game code");
                        Assert.AreEqual(0.25, Number(health, "duty_cap"));
                        Assert.AreEqual(50.0, Number((Dictionary<string, object>)health["tokens_per_s"], "normal"));
                        lock (applied) Assert.IsTrue(applied[1].SetByClient);
                    }
                }
            }
        }

        static DaemonLauncher LiveDaemonLauncher(string runtimeFile)
        {
            var options = DaemonLauncherOptions.FromCommand(TestEnv.ServeCommandFor(runtimeFile));
            options.RuntimeFile = runtimeFile;
            options.StartTimeout = TimeSpan.FromSeconds(90);
            return new DaemonLauncher(options);
        }
    }
}
