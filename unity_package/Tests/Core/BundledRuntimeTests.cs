using System.Collections.Generic;
using System.IO;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>Where a build carries the runtime and the pack, and the command that starts them (tests/unity/UnityLayerTests.cs launches one).</summary>
    [TestFixture]
    public class BundledRuntimeTests
    {
        [Test]
        public void TheRuntimeStartsWithThePackTheBuildCarries()
        {
            string streaming = TestEnv.TempDir();
            string root = BundledRuntime.Root(streaming);
            Assert.AreEqual(Path.Combine(streaming, "Loraloom"), root);
            Assert.AreEqual(Path.Combine(root, "runtime", "loraloom.exe"), BundledRuntime.ExecutablePath(root, true));
            Assert.AreEqual(Path.Combine(root, "runtime", "loraloom"), BundledRuntime.ExecutablePath(root, false));
            Assert.IsNull(BundledRuntime.LaunchOptions(root, new[] { "serve" }), "no runtime there");

            Directory.CreateDirectory(Path.Combine(root, "runtime"));
            File.WriteAllText(BundledRuntime.ExecutablePath(root), "");
            DaemonLauncherOptions noPack = BundledRuntime.LaunchOptions(root, new[] { "serve", "--port", "0" });
            Assert.AreEqual(BundledRuntime.ExecutablePath(root), noPack.Executable);
            CollectionAssert.AreEqual(new[] { "serve", "--port", "0" }, noPack.Arguments, "no pack: the command's words only");
            Assert.AreEqual(Path.Combine(root, "runtime"), noPack.WorkingDirectory);

            Directory.CreateDirectory(Path.Combine(root, "pack"));
            File.WriteAllText(Path.Combine(root, "pack", "manifest.json"), "{}");
            DaemonLauncherOptions withPack = BundledRuntime.LaunchOptions(root, new List<string> { "serve", "--port", "0" });
            CollectionAssert.AreEqual(new[] { "serve", "--port", "0", "--pack", Path.Combine(root, "pack") }, withPack.Arguments);
            CollectionAssert.AreEqual(new[] { "serve", "--pack", Path.Combine(root, "pack") }, BundledRuntime.LaunchOptions(root, null).Arguments);
            DaemonLauncherOptions own = BundledRuntime.LaunchOptions(root, new[] { "serve", "--pack", "/elsewhere" });
            CollectionAssert.AreEqual(new[] { "serve", "--pack", "/elsewhere" }, own.Arguments, "a pack named in the command wins");
        }
    }
}
