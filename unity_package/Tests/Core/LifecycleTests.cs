using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Threading;
using System.Threading.Tasks;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>
    /// The connection's life cycle with daemons of our own: a game that starts before its daemon,
    /// a daemon restarted under a conversation (stopped with SIGTERM, or killed), and stopping a
    /// started daemon without blocking the caller.
    /// </summary>
    [TestFixture]
    public class LifecycleTests
    {
        /// <summary>What a client raised, in order ("connected", "reconnected", "disconnected 1001", "failed code").</summary>
        sealed class Events
        {
            readonly List<string> _seen = new List<string>();

            public Events(LoraloomClient client)
            {
                client.Connected += w => Add("connected");
                client.Reconnected += w => Add("reconnected");
                client.Disconnected += (code, why) => Add("disconnected " + code);
                client.ConnectionFailed += e => Add("failed " + e.Code);
            }

            void Add(string what) { lock (_seen) _seen.Add(what); }

            public List<string> Seen { get { lock (_seen) return _seen.ToList(); } }

            public List<string> WithoutFailures { get { return Seen.Where(s => !s.StartsWith("failed")).ToList(); } }

            public bool WaitFor(string what, int count = 1)
            {
                var clock = Stopwatch.StartNew();
                while (clock.Elapsed < TestEnv.Patience)
                {
                    if (Seen.Count(s => s == what) >= count) return true;
                    Thread.Sleep(20);
                }
                return false;
            }
        }

        static LoraloomClientOptions Patient(string runtimeFile)
        {
            return new LoraloomClientOptions
            {
                RuntimeFile = runtimeFile,
                RequestConnectWait = TimeSpan.FromSeconds(120),
                ReconnectMinDelay = TimeSpan.FromMilliseconds(100),
                ReconnectMaxDelay = TimeSpan.FromMilliseconds(500),
            };
        }

        static Generate Line(int maxTokens)
        {
            var settings = new Generate { MaxTokens = maxTokens, Temperature = 0.0 };
            settings.Adapters.Add(new AdapterRef("alpha"));
            settings.Stop.Clear();
            return settings;
        }

        // A line long enough to be surely still streaming when the daemon is stopped under it (these
        // daemons run a tiny model with an 8192-token context).
        const int LongLine = 6000;

        static DaemonLauncher Launcher(string runtimeFile)
        {
            var options = DaemonLauncherOptions.FromCommand(TestEnv.LongServeCommandFor(runtimeFile));
            options.RuntimeFile = runtimeFile;
            options.StartTimeout = TimeSpan.FromSeconds(90);
            return new DaemonLauncher(options);
        }

        [Test]
        public void ALineAskedBeforeTheDaemonIsUpIsAnswered()
        {
            string runtimeFile = Path.Combine(TestEnv.TempDir(), "daemon.json");
            Events events = null;
            LoraloomClient client = LoraloomClient.Open(Patient(runtimeFile), c => events = new Events(c));
            DaemonLauncher launcher = null;
            try
            {
                Assert.AreEqual(ConnectionState.Connecting, client.State);
                var npc = new Conversation("You are a test NPC.");
                Task<Completion> early = npc.AskAsync(client, "Are you awake?", Line(6));
                Assert.IsTrue(events.WaitFor("failed " + ErrorCodes.DaemonNotFound, 2), "the client keeps trying: " + string.Join(", ", events.Seen));
                Assert.IsFalse(early.IsCompleted, "the line waits for the daemon");

                launcher = Launcher(runtimeFile);
                TestEnv.Await(launcher.EnsureRunningAsync(), TimeSpan.FromSeconds(120));
                Completion done = TestEnv.Await(early);
                Assert.That(done.FinishReason, Is.EqualTo(FinishReason.Stop).Or.EqualTo(FinishReason.Length));
                Assert.AreEqual(2, npc.History.Count, "the early line is in the history");
                CollectionAssert.AreEqual(new[] { "connected" }, events.WithoutFailures, "a first connection, no reconnection");
                Assert.IsNotNull(TestEnv.Await(client.WaitUntilConnectedAsync()).TextModel);
            }
            finally
            {
                client.Dispose();
                if (launcher != null) launcher.Dispose();
            }
        }

        [Test]
        public void ALineWaitsOnlyAsLongAsRequestConnectWait()
        {
            string runtimeFile = Path.Combine(TestEnv.TempDir(), "daemon.json");
            var options = Patient(runtimeFile);
            options.RequestConnectWait = TimeSpan.FromSeconds(1);
            using (LoraloomClient client = LoraloomClient.Open(options))
            {
                LoraloomException e = LiveDaemonTests.Fault(new Conversation().AskAsync(client, "anyone?", Line(4)));
                Assert.AreEqual(ErrorCodes.NotConnected, e.Code);
                StringAssert.Contains(ErrorCodes.DaemonNotFound, e.Reason, "it says why the attempts failed");
            }
        }

        [Test]
        public void ARestartWithSigtermKeepsTheWaitingLinesAndRaisesTheEvents()
        {
            Restart(killed: false);
        }

        [Test]
        public void ARestartAfterSigkillKeepsTheWaitingLinesAndRaisesTheEvents()
        {
            Restart(killed: true);
        }

        static void Restart(bool killed)
        {
            string runtimeFile = Path.Combine(TestEnv.TempDir(), "daemon.json");
            DaemonLauncher first = Launcher(runtimeFile);
            LoraloomClient client = null;
            try
            {
                RuntimeInfo before = TestEnv.Await(first.EnsureRunningAsync(), TimeSpan.FromSeconds(120));
                Events events = null;
                client = LoraloomClient.Open(Patient(runtimeFile), c => events = new Events(c));
                Assert.IsTrue(events.WaitFor("connected"));
                var npc = new Conversation("You are a test NPC.");
                TestEnv.Await(npc.AskAsync(client, "before", Line(4)));

                // One line streaming when the daemon goes, one waiting behind it in the conversation,
                // and (before a kill) one request on the wire that the frozen daemon never saw. (After
                // SIGCONT a SIGTERMed daemon may still take such a request up before it stops: then
                // whether it streamed first is a race, so that case is the kill's.)
                var streaming = new ManualResetEventSlim();
                Generate story = Line(LongLine);
                story.Temperature = 0.8;
                story.RepetitionPenalty = 5.0; // keeps the end-of-turn token unlikely: a long answer
                Task<Completion> inFlight = npc.AskAsync(client, "a long one", story, piece => streaming.Set());
                Task<Completion> waiting = npc.AskAsync(client, "after the restart", Line(4));
                Assert.IsTrue(streaming.Wait(TestEnv.Patience));
                Signal("STOP", before.Pid);
                Generate probe = Line(4);
                probe.Prompt = "Are you there?";
                Task<Completion> unanswered = killed ? client.GenerateAsync(probe) : Task.FromResult<Completion>(null);
                Thread.Sleep(300);
                Assert.IsFalse(inFlight.IsCompleted, "the daemon is frozen");
                if (killed) Assert.IsFalse(unanswered.IsCompleted, "the daemon is frozen");
                if (killed)
                {
                    using (Process daemon = Process.GetProcessById(before.Pid)) daemon.Kill();
                }
                else
                {
                    Task stopping = first.StopAsync();
                    Signal("CONT", before.Pid); // it handles the SIGTERM once it runs again
                    Assert.IsTrue(stopping.Wait(TestEnv.Patience));
                }
                Assert.IsTrue(events.WaitFor(killed ? "disconnected 1006" : "disconnected 1001"), string.Join(", ", events.Seen));
                Assert.IsTrue(Task.WaitAny(new Task[] { inFlight }, TestEnv.Patience) == 0, "the streaming line ended");
                Assert.IsTrue(inFlight.IsFaulted, "it had streamed: it fails, it is not sent again");
                Assert.AreEqual(killed ? ErrorCodes.ConnectionClosed : ErrorCodes.ShuttingDown,
                    ((LoraloomException)inFlight.Exception.InnerException).Code);
                Assert.IsFalse(waiting.IsCompleted, "the line behind it waits for the new daemon");
                if (killed) Assert.IsFalse(unanswered.IsCompleted, "so does the request the daemon said nothing about");
                Assert.AreEqual(killed, File.Exists(runtimeFile), killed ? "a killed daemon leaves its runtime file" : "SIGTERM removes it");

                using (DaemonLauncher second = Launcher(runtimeFile))
                {
                    RuntimeInfo after = TestEnv.Await(second.EnsureRunningAsync(), TimeSpan.FromSeconds(120));
                    Assert.AreNotEqual(before.Pid, after.Pid);
                    Completion done = TestEnv.Await(waiting);
                    Assert.That(done.FinishReason, Is.EqualTo(FinishReason.Stop).Or.EqualTo(FinishReason.Length));
                    if (killed)
                        Assert.That(TestEnv.Await(unanswered).FinishReason, Is.EqualTo(FinishReason.Stop).Or.EqualTo(FinishReason.Length),
                            "sent again on the new connection and answered");
                    Assert.AreEqual("after the restart", npc.History[npc.History.Count - 2].Content);
                    string expected = killed ? "disconnected 1006" : "disconnected 1001";
                    CollectionAssert.AreEqual(new[] { "connected", expected, "connected", "reconnected" }, events.WithoutFailures);
                    client.Dispose();
                    client = null;
                }
            }
            finally
            {
                if (client != null) client.Dispose();
                first.Dispose();
            }
        }

        [Test]
        public void StopAsyncSendsSigtermAndKillsAfterTheGraceWithoutBlocking()
        {
            // A stand-in daemon that publishes a runtime file, listens, and ignores SIGTERM: only the
            // kill after the grace period ends it.
            string dir = TestEnv.TempDir();
            string runtimeFile = Path.Combine(dir, "daemon.json");
            string termed = Path.Combine(dir, "termed");
            string script = string.Join("\n", new[]
            {
                "import json, os, signal, socket, sys, time",
                "signal.signal(signal.SIGTERM, lambda *a: open(sys.argv[2], 'w').close())",
                "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(5); port = s.getsockname()[1]",
                "json.dump({'url': 'ws://127.0.0.1:%d' % port, 'host': '127.0.0.1', 'port': port, 'token': 't', 'pid': os.getpid(),",
                "           'version': '0', 'protocol': 1}, open(sys.argv[1], 'w'))",
                "while True: time.sleep(0.05)",
            });
            var options = new DaemonLauncherOptions
            {
                Executable = TestEnv.ServeCommand[0],
                Arguments = new List<string> { "-c", script, runtimeFile, termed },
                RuntimeFile = runtimeFile,
                StopGrace = TimeSpan.FromSeconds(5),
            };
            using (var launcher = new DaemonLauncher(options))
            {
                RuntimeInfo info = TestEnv.Await(launcher.EnsureRunningAsync());
                Task stopping = launcher.StopAsync();
                Assert.IsFalse(stopping.IsCompleted, "StopAsync returns before the process is gone");
                var clock = Stopwatch.StartNew();
                while (!File.Exists(termed) && clock.Elapsed < TimeSpan.FromSeconds(10)) Thread.Sleep(20);
                Assert.IsTrue(File.Exists(termed), "the process got SIGTERM first");
                Assert.IsTrue(IsAlive(info.Pid), "it ignores SIGTERM, so it is still there within the grace period");
                Assert.IsTrue(stopping.Wait(TimeSpan.FromSeconds(30)), "the stop ends");
                Assert.IsFalse(IsAlive(info.Pid), "killed after the grace period");
                Assert.IsFalse(File.Exists(runtimeFile), "the launcher removed the runtime file the killed process left");
                Assert.IsFalse(launcher.OwnsProcess);
                launcher.Stop(); // idempotent
            }
        }

        static void Signal(string name, int pid)
        {
            using (Process kill = Process.Start(new ProcessStartInfo("kill", "-" + name + " " + pid) { UseShellExecute = false }))
            {
                kill.WaitForExit();
                Assert.AreEqual(0, kill.ExitCode, "kill -" + name);
            }
        }

        static bool IsAlive(int pid)
        {
            try
            {
                using (Process process = Process.GetProcessById(pid)) return !process.HasExited;
            }
            catch (ArgumentException)
            {
                return false;
            }
        }
    }
}
