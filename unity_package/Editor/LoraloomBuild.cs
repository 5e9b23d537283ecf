using System;
using System.IO;
using Loraloom.Core;
using UnityEditor;
using UnityEditor.Build;
using UnityEditor.Build.Reporting;
using UnityEngine;

namespace Loraloom.Editor
{
    /// <summary>
    /// What a player build carries (Project Settings > Loraloom; saved in
    /// ProjectSettings/LoraloomBuild.json, so it is versioned with the project): the runtime folder
    /// <c>loraloom bundle --out DIR</c> wrote and the pack folder <c>loraloom pack ... --out PACK</c>
    /// wrote. Relative paths are from the project's folder.
    /// </summary>
    [Serializable]
    public sealed class LoraloomBuildSettings
    {
        public const string FileName = "ProjectSettings/LoraloomBuild.json";

        [Tooltip("Copy the runtime and the pack into every desktop player build.")]
        public bool copyIntoBuilds = true;
        [Tooltip("The folder `loraloom bundle --out DIR` wrote (for the platform being built).")]
        public string runtimeFolder = "";
        [Tooltip("The folder `loraloom pack ... --out PACK` wrote (empty: no pack; the runtime then needs its own --text-model).")]
        public string packFolder = "";

        public static LoraloomBuildSettings Load()
        {
            var settings = new LoraloomBuildSettings();
            if (File.Exists(FileName)) JsonUtility.FromJsonOverwrite(File.ReadAllText(FileName), settings);
            return settings;
        }

        public void Save() { File.WriteAllText(FileName, JsonUtility.ToJson(this, true)); }
    }

    /// <summary>
    /// After a desktop player build, copies the configured runtime and pack into the build's
    /// StreamingAssets (<c>Loraloom/runtime</c>, <c>Loraloom/pack</c>), where
    /// <see cref="Loraloom.Unity.LoraloomDaemon"/> starts them in the player.
    /// </summary>
    /// <remarks>
    /// A post-build step, not a pre-build copy into Assets/StreamingAssets: the runtime weighs
    /// hundreds of MB to GBs (PyTorch), which Unity would import into the project and keep there;
    /// copied after the build, it never enters the AssetDatabase and leaves nothing behind. The
    /// price: the step knows where each desktop platform puts StreamingAssets
    /// (<see cref="StreamingAssetsOf"/>). Android, iOS and WebGL get nothing (no local daemon).
    /// </remarks>
    public sealed class LoraloomBuildStep : IPostprocessBuildWithReport
    {
        public int callbackOrder { get { return 100; } }

        public void OnPostprocessBuild(BuildReport report)
        {
            LoraloomBuildSettings settings = LoraloomBuildSettings.Load();
            if (!settings.copyIntoBuilds || (string.IsNullOrEmpty(settings.runtimeFolder) && string.IsNullOrEmpty(settings.packFolder))) return;
            BuildTarget target = report.summary.platform;
            string streamingAssets = StreamingAssetsOf(target, report.summary.outputPath);
            if (streamingAssets == null)
            {
                Debug.LogWarning("loraloom: " + target + " players run no local daemon; nothing copied into the build.");
                return;
            }
            string root = CopyInto(streamingAssets, target, Full(settings.runtimeFolder), Full(settings.packFolder));
            Debug.Log("loraloom: copied the runtime and pack into " + root);
        }

        /// <summary>
        /// The StreamingAssets folder of a desktop build at <paramref name="outputPath"/> (what
        /// BuildReport.summary.outputPath says: the .exe, the Linux executable, the .app), or null
        /// for a platform that carries no runtime.
        /// </summary>
        public static string StreamingAssetsOf(BuildTarget target, string outputPath)
        {
            switch (target)
            {
                case BuildTarget.StandaloneWindows:
                case BuildTarget.StandaloneWindows64:
                case BuildTarget.StandaloneLinux64:
                    // Game.exe / Game.x86_64 beside Game_Data/StreamingAssets.
                    string folder = Path.GetDirectoryName(Path.GetFullPath(outputPath));
                    return Path.Combine(Path.Combine(folder, Path.GetFileNameWithoutExtension(outputPath) + "_Data"), "StreamingAssets");
                case BuildTarget.StandaloneOSX:
                    string app = outputPath.EndsWith(".app", StringComparison.OrdinalIgnoreCase) ? outputPath : outputPath + ".app";
                    return Path.Combine(Path.GetFullPath(app), "Contents/Resources/Data/StreamingAssets".Replace('/', Path.DirectorySeparatorChar));
                default:
                    return null;
            }
        }

        /// <summary>
        /// Copies <paramref name="runtimeFolder"/> (null: none) to <c>Loraloom/runtime</c> and
        /// <paramref name="packFolder"/> (null: none) to <c>Loraloom/pack</c> under
        /// <paramref name="streamingAssets"/>, replacing what a previous build left; returns that
        /// root. Fails the build (BuildFailedException) when the runtime has no executable for the
        /// target or the pack no manifest.
        /// </summary>
        public static string CopyInto(string streamingAssets, BuildTarget target, string runtimeFolder, string packFolder)
        {
            string root = BundledRuntime.Root(streamingAssets);
            bool windows = target == BuildTarget.StandaloneWindows || target == BuildTarget.StandaloneWindows64;
            if (runtimeFolder != null)
            {
                string executable = Path.Combine(runtimeFolder, windows ? "loraloom.exe" : "loraloom");
                if (!File.Exists(executable))
                    throw new BuildFailedException("loraloom: " + executable + " does not exist: build the runtime for " + target
                        + " with `loraloom bundle --out DIR` on that platform and set Project Settings > Loraloom > Runtime Folder to DIR");
                Replace(runtimeFolder, Path.Combine(root, BundledRuntime.RuntimeFolder));
            }
            if (packFolder != null)
            {
                if (!File.Exists(Path.Combine(packFolder, "manifest.json")))
                    throw new BuildFailedException("loraloom: " + packFolder + " is not a game pack (no manifest.json): write one with `loraloom pack --model DIR --adapters DIR... --out PACK`");
                Replace(packFolder, Path.Combine(root, BundledRuntime.PackFolder));
            }
            return root;
        }

        static string Full(string folder)
        {
            return string.IsNullOrEmpty(folder) ? null : Path.GetFullPath(folder);
        }

        static void Replace(string source, string destination)
        {
            if (Directory.Exists(destination)) Directory.Delete(destination, true);
            CopyTree(new DirectoryInfo(source), destination);
        }

        // File.Copy keeps a file's Unix permissions (the runtime's executable bit) on Mono and .NET.
        static void CopyTree(DirectoryInfo source, string destination)
        {
            Directory.CreateDirectory(destination);
            foreach (FileInfo file in source.GetFiles()) file.CopyTo(Path.Combine(destination, file.Name), true);
            foreach (DirectoryInfo child in source.GetDirectories()) CopyTree(child, Path.Combine(destination, child.Name));
        }
    }

    /// <summary>Project Settings > Loraloom: the runtime and pack folders a build carries.</summary>
    static class LoraloomBuildSettingsProvider
    {
        [SettingsProvider]
        static SettingsProvider Create()
        {
            return new SettingsProvider("Project/Loraloom", SettingsScope.Project) { guiHandler = Draw };
        }

        static void Draw(string searchContext)
        {
            LoraloomBuildSettings settings = LoraloomBuildSettings.Load();
            bool copy = EditorGUILayout.Toggle("Copy Into Builds", settings.copyIntoBuilds);
            string runtime = Folder("Runtime Folder", settings.runtimeFolder);
            string pack = Folder("Pack Folder", settings.packFolder);
            EditorGUILayout.HelpBox("Desktop player builds get the runtime in StreamingAssets/Loraloom/runtime and the pack in "
                + "StreamingAssets/Loraloom/pack; LoraloomDaemon starts them in the player (in the editor it keeps using "
                + "the developer's loraloom). Build the runtime on each target platform: `loraloom bundle --out DIR`.", MessageType.Info);
            if (copy == settings.copyIntoBuilds && runtime == settings.runtimeFolder && pack == settings.packFolder) return;
            settings.copyIntoBuilds = copy;
            settings.runtimeFolder = runtime;
            settings.packFolder = pack;
            settings.Save();
        }

        static string Folder(string label, string value)
        {
            using (new EditorGUILayout.HorizontalScope())
            {
                value = EditorGUILayout.TextField(label, value);
                if (GUILayout.Button("Browse", GUILayout.Width(70)))
                {
                    string picked = EditorUtility.OpenFolderPanel(label, value, "");
                    if (!string.IsNullOrEmpty(picked)) value = picked;
                }
            }
            return value;
        }
    }
}
