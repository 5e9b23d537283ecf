using System;
using System.IO;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>The runtime-file location rule and reader, as bridge/discovery.py defines them.</summary>
    [TestFixture]
    public class RuntimeFileTests
    {
        string _savedOverride;
        string _savedXdg;
        string _savedHome;

        [SetUp]
        public void Save()
        {
            _savedOverride = Environment.GetEnvironmentVariable(RuntimeFile.EnvironmentVariable);
            _savedXdg = Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR");
            _savedHome = Environment.GetEnvironmentVariable("HOME");
        }

        [TearDown]
        public void Restore()
        {
            Environment.SetEnvironmentVariable(RuntimeFile.EnvironmentVariable, _savedOverride);
            Environment.SetEnvironmentVariable("XDG_RUNTIME_DIR", _savedXdg);
            Environment.SetEnvironmentVariable("HOME", _savedHome);
        }

        [Test]
        public void TheEnvironmentVariableWins()
        {
            Environment.SetEnvironmentVariable(RuntimeFile.EnvironmentVariable, "/somewhere/else.json");
            Environment.SetEnvironmentVariable("XDG_RUNTIME_DIR", "/run/user/1000");
            Assert.AreEqual("/somewhere/else.json", RuntimeFile.DefaultPath());
        }

        [Test]
        public void LinuxUsesXdgRuntimeDirThenLocalState()
        {
            if (Environment.OSVersion.Platform != PlatformID.Unix || Directory.Exists("/System/Library/CoreServices"))
                Assert.Ignore("not run: the XDG rule applies to Linux and other non-macOS Unix only");
            Environment.SetEnvironmentVariable(RuntimeFile.EnvironmentVariable, null);
            Environment.SetEnvironmentVariable("XDG_RUNTIME_DIR", "/run/user/1000");
            Assert.AreEqual("/run/user/1000/loraloom/daemon.json", RuntimeFile.DefaultPath());
            Environment.SetEnvironmentVariable("XDG_RUNTIME_DIR", null);
            Environment.SetEnvironmentVariable("HOME", "/home/player");
            Assert.AreEqual("/home/player/.local/state/loraloom/daemon.json", RuntimeFile.DefaultPath());
        }

        [Test]
        public void ReadsTheLiveDaemonsFile()
        {
            RuntimeInfo info = RuntimeFile.Read(TestEnv.Require("LORALOOM_TEST_RUNTIME_FILE"));
            Assert.AreEqual(TestEnv.Url.TrimEnd('/'), info.Url.TrimEnd('/'));
            Assert.AreEqual(TestEnv.Token, info.Token);
            Assert.AreEqual(Protocol.Version, info.Protocol);
            Assert.Greater(info.Pid, 0);
            StringAssert.EndsWith(":" + info.Port, info.Url.TrimEnd('/'));
        }

        [Test]
        public void MissingOrMalformedFilesSayDaemonNotFound()
        {
            string dir = TestEnv.TempDir();
            string path = Path.Combine(dir, "daemon.json");
            var missing = Assert.Throws<LoraloomException>(() => RuntimeFile.Read(path));
            Assert.AreEqual(ErrorCodes.DaemonNotFound, missing.Code);
            StringAssert.Contains(path, missing.Message);

            File.WriteAllText(path, "{\"url\": \"ws://127.0.0.1:1\", \"port\": ");
            Assert.AreEqual(ErrorCodes.DaemonNotFound, Assert.Throws<LoraloomException>(() => RuntimeFile.Read(path)).Code);

            File.WriteAllText(path, "{\"url\": \"ws://127.0.0.1:1\"}");
            Assert.AreEqual(ErrorCodes.DaemonNotFound, Assert.Throws<LoraloomException>(() => RuntimeFile.Read(path)).Code);

            RuntimeInfo info;
            Assert.IsFalse(RuntimeFile.TryRead(path, out info));
            Assert.IsNull(info);
        }

        [Test]
        public void ConnectingWithoutADaemonSaysDaemonNotFound()
        {
            string path = Path.Combine(TestEnv.TempDir(), "daemon.json");
            var e = LiveDaemonTests.Fault(LoraloomClient.ConnectAsync(new LoraloomClientOptions { RuntimeFile = path }));
            Assert.AreEqual(ErrorCodes.DaemonNotFound, e.Code);
        }
    }
}
