using System;
using System.Collections.Generic;
using System.IO;
using System.Threading.Tasks;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>
    /// What the test driver (tests/unity/test_unity.py) hands over: the live daemon's address and
    /// token, its adapter folder, the golden frames and the argv that starts another daemon.
    /// </summary>
    static class TestEnv
    {
        public static string Require(string name)
        {
            string value = Environment.GetEnvironmentVariable(name);
            // Ignored rather than failed, so the suite also opens in Unity's Test Runner; the pytest
            // driver sets every variable and fails on any test that did not run.
            if (string.IsNullOrEmpty(value))
                Assert.Ignore(name + " is not set: these tests need a live daemon (see tests/unity/test_unity.py)");
            return value;
        }

        public static string Url { get { return Require("LORALOOM_TEST_URL"); } }
        public static string Token { get { return Require("LORALOOM_TEST_TOKEN"); } }
        public static string AdapterDir { get { return Require("LORALOOM_TEST_ADAPTER_DIR"); } }

        /// <summary>
        /// A daemon on the test adapters (same token) with a 2048-token context: tool definitions are
        /// long in the tiny model's 384-token vocabulary.
        /// </summary>
        public static string ToolsUrl { get { return Require("LORALOOM_TEST_TOOLS_URL"); } }

        public static string FramesDir
        {
            get
            {
                string dir = Environment.GetEnvironmentVariable("LORALOOM_TEST_FRAMES");
                if (!string.IsNullOrEmpty(dir)) return dir;
                // Run from the repository (inside Unity, say): the frames sit beside the package.
                return Path.GetFullPath(Path.Combine("..", Path.Combine("tests", Path.Combine("fixtures", "frames"))));
            }
        }

        /// <summary>The argv of `python -m daemon serve ...` with {runtime_file} and {port} left as placeholders.</summary>
        public static List<string> ServeCommand
        {
            get
            {
                var parsed = Json.Parse(Require("LORALOOM_TEST_SERVE_COMMAND")) as List<object>;
                if (parsed == null || parsed.Count == 0) Assert.Fail("LORALOOM_TEST_SERVE_COMMAND is not a JSON list");
                return parsed.ConvertAll(x => (string)x);
            }
        }

        /// <summary>The serve argv for a given runtime file, the way the launcher would be configured.</summary>
        public static List<string> ServeCommandFor(string runtimeFile)
        {
            return ServeCommand.ConvertAll(arg => arg.Replace("{runtime_file}", runtimeFile).Replace("{port}", "0"));
        }

        /// <summary>
        /// The same on a tiny model with a long context (8192 tokens): for lines that must still be
        /// streaming when the daemon is stopped under them.
        /// </summary>
        public static List<string> LongServeCommandFor(string runtimeFile)
        {
            var parsed = Json.Parse(Require("LORALOOM_TEST_LONG_SERVE_COMMAND")) as List<object>;
            if (parsed == null || parsed.Count == 0) Assert.Fail("LORALOOM_TEST_LONG_SERVE_COMMAND is not a JSON list");
            return parsed.ConvertAll(x => ((string)x).Replace("{runtime_file}", runtimeFile).Replace("{port}", "0"));
        }

        public static readonly TimeSpan Patience = TimeSpan.FromSeconds(60);

        /// <summary>
        /// Runs an async test body synchronously with a time limit: NUnit 2.6 and Unity's NUnit 3 both
        /// run plain void tests the same way, and a hang becomes a failure instead of a stuck run.
        /// </summary>
        public static void Run(Func<Task> body, TimeSpan? limit = null)
        {
            var task = Task.Run(body);
            TimeSpan wait = limit ?? Patience;
            if (!task.Wait(wait)) Assert.Fail("the test did not finish within " + wait.TotalSeconds + " s");
        }

        public static T Await<T>(Task<T> task, TimeSpan? limit = null)
        {
            TimeSpan wait = limit ?? Patience;
            if (!task.Wait(wait)) Assert.Fail("no answer within " + wait.TotalSeconds + " s");
            return task.Result;
        }

        public static string TempDir()
        {
            string dir = Path.Combine(Path.GetTempPath(), "loraloom-cs-" + Guid.NewGuid().ToString("N").Substring(0, 12));
            Directory.CreateDirectory(dir);
            return dir;
        }
    }
}
