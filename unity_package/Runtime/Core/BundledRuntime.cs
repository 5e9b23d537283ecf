using System.Collections.Generic;
using System.IO;
using System.Runtime.InteropServices;

namespace Loraloom.Core
{
    /// <summary>
    /// Where a game build carries loraloom (docs/SHIPPING.md): the self-contained runtime that
    /// <c>loraloom bundle</c> writes and the game pack that <c>loraloom pack</c> writes, under one
    /// root, <c>&lt;StreamingAssets&gt;/Loraloom/</c> in a Unity player:
    /// <c>runtime/loraloom</c> (<c>loraloom.exe</c> on Windows) and <c>pack/manifest.json</c>.
    /// </summary>
    public static class BundledRuntime
    {
        /// <summary>The folder under StreamingAssets.</summary>
        public const string FolderName = "Loraloom";
        public const string RuntimeFolder = "runtime";
        public const string PackFolder = "pack";

        /// <summary>The root a player build carries under <paramref name="streamingAssetsPath"/>.</summary>
        public static string Root(string streamingAssetsPath)
        {
            return Path.Combine(streamingAssetsPath ?? "", FolderName);
        }

        /// <summary>The runtime's executable under <paramref name="root"/> for this machine.</summary>
        public static string ExecutablePath(string root)
        {
            return ExecutablePath(root, RuntimeInformation.IsOSPlatform(OSPlatform.Windows));
        }

        public static string ExecutablePath(string root, bool windows)
        {
            return Path.Combine(Path.Combine(root, RuntimeFolder), windows ? "loraloom.exe" : "loraloom");
        }

        public static string PackPath(string root) { return Path.Combine(root, PackFolder); }

        /// <summary>True when <paramref name="root"/> holds a runtime executable.</summary>
        public static bool HasRuntime(string root) { return File.Exists(ExecutablePath(root)); }

        /// <summary>True when <paramref name="root"/> holds a game pack (its manifest).</summary>
        public static bool HasPack(string root) { return File.Exists(Path.Combine(PackPath(root), "manifest.json")); }

        /// <summary>
        /// How to start the runtime under <paramref name="root"/>: its executable with
        /// <paramref name="arguments"/> (the daemon command's words after its program, e.g.
        /// <c>serve --port 0</c>), plus <c>--pack &lt;root&gt;/pack</c> when the build carries a
        /// pack and the arguments name none. Null when there is no runtime there.
        /// </summary>
        public static DaemonLauncherOptions LaunchOptions(string root, IList<string> arguments)
        {
            if (!HasRuntime(root)) return null;
            var words = new List<string>(arguments ?? new string[0]);
            if (words.Count == 0) words.Add("serve");
            if (HasPack(root) && !words.Contains("--pack"))
            {
                words.Add("--pack");
                words.Add(PackPath(root));
            }
            return new DaemonLauncherOptions
            {
                Executable = ExecutablePath(root),
                Arguments = words,
                // The runtime's own folder: PyInstaller's one-folder build finds its files beside it.
                WorkingDirectory = Path.Combine(root, RuntimeFolder),
            };
        }
    }
}
