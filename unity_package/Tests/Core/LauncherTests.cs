using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Threading;
using System.Threading.Tasks;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>Starting, finding, stopping and reconnecting to daemons of our own (not the shared one).</summary>
    [TestFixture]
    public class LauncherTests
    {
        static DaemonLauncher Launcher(string runtimeFile)
        {
            var options = DaemonLauncherOptions.FromCommand(TestEnv.ServeCommandFor(runtimeFile));
            options.RuntimeFile = runtimeFile;
            options.StartTimeout = TimeSpan.FromSeconds(90);
            return new DaemonLauncher(options);
        }

        [Test]
        public void LauncherStartsADaemonAndFindsItThroughTheRuntimeFile()
        {
            string dir = TestEnv.TempDir();
            string runtimeFile = Path.Combine(dir, "daemon.json");
            using (DaemonLauncher launcher = Launcher(runtimeFile))
            {
                Assert.IsFalse(File.Exists(runtimeFile));
                RuntimeInfo info = TestEnv.Await(launcher.EnsureRunningAsync(), TimeSpan.FromSeconds(120));
                Assert.IsTrue(launcher.OwnsProcess, "no daemon was running there, so the launcher started one");
                Assert.AreEqual(launcher.ProcessId, info.Pid, "the runtime file names the started process");
                Assert.AreEqual(Protocol.Version, info.Protocol);
                StringAssert.StartsWith("ws://127.0.0.1:", info.Url);

                // A second call finds the same daemon instead of starting another.
                RuntimeInfo again = TestEnv.Await(launcher.EnsureRunningAsync());
                Assert.AreEqual(info.Pid, again.Pid);

                var client = TestEnv.Await(LoraloomClient.ConnectAsync(new LoraloomClientOptions { RuntimeFile = runtimeFile }));
                try
                {
                    TestEnv.Await(client.PingAsync());
                    Assert.IsNotNull(client.Welcome.TextModel);
                }
                finally
                {
                    client.Dispose();
                }

                int pid = info.Pid;
                launcher.Stop();
                Assert.IsFalse(launcher.OwnsProcess);
                Assert.IsFalse(IsAlive(pid), "the daemon process is gone after Stop");
                Assert.IsFalse(File.Exists(runtimeFile), "no runtime file is left behind");
            }
        }

        [Test]
        public void LauncherUsesADaemonThatIsAlreadyRunning()
        {
            string shared = TestEnv.Require("LORALOOM_TEST_RUNTIME_FILE");
            var options = new DaemonLauncherOptions { Executable = "/nonexistent/loraloom", RuntimeFile = shared };
            using (var launcher = new DaemonLauncher(options))
            {
                RuntimeInfo info = TestEnv.Await(launcher.EnsureRunningAsync());
                Assert.AreEqual(TestEnv.Url.TrimEnd('/'), info.Url.TrimEnd('/'));
                Assert.IsFalse(launcher.OwnsProcess, "a running daemon is used, not started");
                Assert.IsNull(launcher.ProcessId);
            }
            Assert.IsTrue(File.Exists(shared), "disposing the launcher leaves a daemon it did not start alone");
        }

        [Test]
        public void LauncherReportsADaemonThatCannotStart()
        {
            string dir = TestEnv.TempDir();
            var options = new DaemonLauncherOptions
            {
                Executable = TestEnv.ServeCommand[0],
                Arguments = new List<string> { "-c", "import sys; print('no model here', file=sys.stderr); sys.exit(3)" },
                RuntimeFile = Path.Combine(dir, "daemon.json"),
            };
            using (var launcher = new DaemonLauncher(options))
            {
                var e = LiveDaemonTests.Fault(launcher.EnsureRunningAsync());
                Assert.AreEqual(ErrorCodes.DaemonNotFound, e.Code);
                StringAssert.Contains("code 3", e.Message);
                // The daemon's own words reach the caller, so a user can see why.
                var clock = Stopwatch.StartNew();
                while (!launcher.OutputTail.Contains("no model here") && clock.Elapsed < TimeSpan.FromSeconds(5)) Thread.Sleep(20);
                StringAssert.Contains("no model here", launcher.OutputTail);
            }
        }

        [Test]
        public void ArgumentsSurviveQuotingThroughARealProcess()
        {
            var args = new List<string> { "plain", "two words", "it's", "say \"hi\"", "back\\slash", "trailing\\", "" };
            var probe = new List<string> { "-c", "import sys, json; print(json.dumps(sys.argv[1:]))" };
            probe.AddRange(args);
            var info = new ProcessStartInfo
            {
                FileName = TestEnv.ServeCommand[0],
                Arguments = DaemonLauncher.JoinArguments(probe),
                UseShellExecute = false,
                RedirectStandardOutput = true,
            };
            using (Process process = Process.Start(info))
            {
                string output = process.StandardOutput.ReadToEnd();
                process.WaitForExit();
                var echoed = ((List<object>)Json.Parse(output.Trim())).Cast<string>().ToList();
                CollectionAssert.AreEqual(args, echoed);
            }
        }

        [Test]
        public void CommandLinesSplitLikeAShell()
        {
            CollectionAssert.AreEqual(new[] { "loraloom", "serve", "--port", "0" }, DaemonLauncherOptions.SplitCommandLine("loraloom serve --port 0"));
            CollectionAssert.AreEqual(new[] { "C:\\Program Files\\py.exe", "-m", "daemon", "it's", "" },
                DaemonLauncherOptions.SplitCommandLine("  'C:\\Program Files\\py.exe' -m  daemon \"it's\" ''"));
            CollectionAssert.AreEqual(new[] { "a b", "c\"d" }, DaemonLauncherOptions.SplitCommandLine("a\\ b \"c\\\"d\""));
            CollectionAssert.AreEqual(new[] { "C:\\Users\\me\\loraloom.exe", "\\\\host\\share" },
                DaemonLauncherOptions.SplitCommandLine("C:\\Users\\me\\loraloom.exe \\\\host\\share"));
            var options = DaemonLauncherOptions.FromCommandLine("loraloom serve --port 0");
            Assert.AreEqual("loraloom", options.Executable);
            CollectionAssert.AreEqual(new[] { "serve", "--port", "0" }, options.Arguments);
            Assert.Throws<ArgumentException>(() => DaemonLauncherOptions.SplitCommandLine("say \"unfinished"));
        }

        [Test]
        public void ClientReconnectsAfterTheDaemonRestarts()
        {
            string dir = TestEnv.TempDir();
            string runtimeFile = Path.Combine(dir, "daemon.json");
            DaemonLauncher first = Launcher(runtimeFile);
            LoraloomClient client = null;
            try
            {
                RuntimeInfo before = TestEnv.Await(first.EnsureRunningAsync(), TimeSpan.FromSeconds(120));
                client = TestEnv.Await(LoraloomClient.ConnectAsync(new LoraloomClientOptions
                {
                    RuntimeFile = runtimeFile,
                    RequestConnectWait = TimeSpan.FromSeconds(120),
                    ReconnectMaxDelay = TimeSpan.FromSeconds(1),
                }));
                var states = new List<ConnectionState>();
                var reconnected = new ManualResetEventSlim();
                client.StateChanged += s =>
                {
                    lock (states) states.Add(s);
                    if (s == ConnectionState.Connected) reconnected.Set();
                };
                TestEnv.Await(client.PingAsync());

                // A request streaming when the daemon stops ends: with its result if it was quick,
                // else faulted with shutting_down (the daemon said so) or connection_closed.
                var streaming = new ManualResetEventSlim();
                Task<Completion> inFlight = client.GenerateAsync(new Generate { Prompt = "Once upon a time", MaxTokens = 200, Stop = new List<string>() },
                    piece => streaming.Set());
                Assert.IsTrue(streaming.Wait(TestEnv.Patience), "it streams");
                first.Stop();
                Assert.IsTrue(Task.WaitAny(new Task[] { inFlight }, TestEnv.Patience) == 0, "the request in flight ended");
                if (inFlight.IsFaulted)
                {
                    var code = ((LoraloomException)inFlight.Exception.InnerException).Code;
                    Assert.That(code, Is.EqualTo(ErrorCodes.ShuttingDown).Or.EqualTo(ErrorCodes.ConnectionClosed));
                }

                var clock = Stopwatch.StartNew();
                while (client.State != ConnectionState.Reconnecting && clock.Elapsed < TestEnv.Patience) Thread.Sleep(20);
                Assert.AreEqual(ConnectionState.Reconnecting, client.State);

                // A request made while the daemon is down waits for the reconnection.
                Task<TimeSpan> waiting = client.PingAsync();
                Assert.IsFalse(waiting.IsCompleted);

                using (DaemonLauncher second = Launcher(runtimeFile))
                {
                    RuntimeInfo after = TestEnv.Await(second.EnsureRunningAsync(), TimeSpan.FromSeconds(120));
                    Assert.AreNotEqual(before.Pid, after.Pid);
                    Assert.IsTrue(reconnected.Wait(TestEnv.Patience), "the client reconnected to the new daemon");
                    TestEnv.Await(waiting);
                    Completion done = TestEnv.Await(client.GenerateAsync(new Generate { Prompt = "Hello again", MaxTokens = 4 }));
                    Assert.Greater(done.CompletionTokens, 0);
                    lock (states) CollectionAssert.AreEqual(new[] { ConnectionState.Reconnecting, ConnectionState.Connected }, states);
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
