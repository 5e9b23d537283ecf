using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace Loraloom.Core
{
    /// <summary>How <see cref="DaemonLauncher"/> starts a daemon when none is running.</summary>
    public sealed class DaemonLauncherOptions
    {
        /// <summary>The program to run: the `loraloom` console script by default (it must be on PATH).</summary>
        public string Executable = "loraloom";
        public List<string> Arguments = new List<string> { "serve", "--port", "0" };
        /// <summary>
        /// The runtime file to look for; null is the default location. When set, the daemon is started
        /// with LORALOOM_RUNTIME_FILE pointing there, so it publishes itself where we look.
        /// </summary>
        public string RuntimeFile;
        public string WorkingDirectory;
        /// <summary>Extra environment variables for the daemon.</summary>
        public Dictionary<string, string> Environment = new Dictionary<string, string>();
        /// <summary>Loading a model takes a while on a CPU: how long to wait for the runtime file.</summary>
        public TimeSpan StartTimeout = TimeSpan.FromSeconds(120);
        /// <summary>How long a stopping daemon gets to finish before it is killed.</summary>
        public TimeSpan StopGrace = TimeSpan.FromSeconds(10);

        /// <summary>
        /// Options from one command line as a user types it in the inspector: words split on spaces,
        /// double or single quotes group words, a backslash escapes a following quote or space.
        /// </summary>
        public static DaemonLauncherOptions FromCommandLine(string commandLine)
        {
            return FromCommand(SplitCommandLine(commandLine));
        }

        public static List<string> SplitCommandLine(string commandLine)
        {
            var words = new List<string>();
            var word = new System.Text.StringBuilder();
            bool inWord = false;
            char quote = '\0';
            for (int i = 0; i < (commandLine ?? "").Length; i++)
            {
                char c = commandLine[i];
                if (quote == '\'')
                {
                    if (c == '\'') quote = '\0';
                    else word.Append(c);
                    continue;
                }
                // A backslash escapes only a quote or a space, so Windows paths need no doubling.
                if (c == '\\' && i + 1 < commandLine.Length && IsEscapable(commandLine[i + 1], quote))
                {
                    word.Append(commandLine[++i]);
                    inWord = true;
                    continue;
                }
                if (quote == '"')
                {
                    if (c == '"') quote = '\0';
                    else word.Append(c);
                    continue;
                }
                if (c == '"' || c == '\'')
                {
                    quote = c;
                    inWord = true;
                    continue;
                }
                if (char.IsWhiteSpace(c))
                {
                    if (inWord) words.Add(word.ToString());
                    word.Length = 0;
                    inWord = false;
                    continue;
                }
                word.Append(c);
                inWord = true;
            }
            if (quote != '\0') throw new ArgumentException("unterminated quote in: " + commandLine);
            if (inWord) words.Add(word.ToString());
            return words;
        }

        static bool IsEscapable(char next, char quote)
        {
            if (quote == '"') return next == '"';
            return next == '"' || next == '\'' || char.IsWhiteSpace(next);
        }

        /// <summary>Options from one argv list (program first), e.g. a command line saved in project settings.</summary>
        public static DaemonLauncherOptions FromCommand(IList<string> argv)
        {
            if (argv == null || argv.Count == 0) throw new ArgumentException("the command needs a program", "argv");
            var options = new DaemonLauncherOptions { Executable = argv[0], Arguments = new List<string>() };
            for (int i = 1; i < argv.Count; i++) options.Arguments.Add(argv[i]);
            return options;
        }
    }

    /// <summary>
    /// Finds a running daemon through its runtime file, or starts one and waits until it publishes
    /// itself. A daemon this launcher started is stopped by <see cref="Stop"/>, by Dispose, and when
    /// the process (or Unity's script domain) goes away; one it found running is never touched.
    /// </summary>
    public sealed class DaemonLauncher : IDisposable
    {
        const int OutputLines = 60;

        readonly DaemonLauncherOptions _options;
        readonly Queue<string> _output = new Queue<string>();
        readonly object _gate = new object();
        Process _process;
        Task _stopping;
        bool _hooked;

        public DaemonLauncher(DaemonLauncherOptions options = null)
        {
            _options = options ?? new DaemonLauncherOptions();
        }

        public string RuntimeFilePath { get { return _options.RuntimeFile ?? Loraloom.Core.RuntimeFile.DefaultPath(); } }

        /// <summary>True while a daemon this launcher started is running.</summary>
        public bool OwnsProcess
        {
            get
            {
                lock (_gate) return _process != null && !HasExited(_process);
            }
        }

        /// <summary>The pid of the daemon this launcher started, if any.</summary>
        public int? ProcessId
        {
            get
            {
                lock (_gate) return _process != null ? _process.Id : (int?)null;
            }
        }

        /// <summary>The last lines the started daemon printed, for error messages and status windows.</summary>
        public string OutputTail
        {
            get
            {
                lock (_output) return string.Join("\n", _output.ToArray());
            }
        }

        /// <summary>
        /// The running daemon's runtime info: the one the runtime file names if it answers, else a
        /// daemon started now. Throws daemon_not_found (it would not start or exited) or timeout.
        /// </summary>
        public async Task<RuntimeInfo> EnsureRunningAsync(CancellationToken cancellationToken = default(CancellationToken))
        {
            string path = RuntimeFilePath;
            RuntimeInfo info;
            if (Loraloom.Core.RuntimeFile.TryRead(path, out info) && await IsListeningAsync(info).ConfigureAwait(false))
                return info;

            Process process;
            lock (_gate) process = _process;
            // A daemon this launcher started earlier may still be loading: wait for it, do not start another.
            if (process == null || HasExited(process)) process = Start(path);
            var deadline = Stopwatch.StartNew();
            while (true)
            {
                cancellationToken.ThrowIfCancellationRequested();
                if (HasExited(process))
                {
                    throw new LoraloomException(ErrorCodes.DaemonNotFound, "the daemon exited with code " + ExitCode(process)
                        + " before it was ready:\n" + OutputTail);
                }
                // Only our own daemon's file counts: a stale file of a dead daemon may still be there.
                if (Loraloom.Core.RuntimeFile.TryRead(path, out info) && info.Pid == process.Id
                    && await IsListeningAsync(info).ConfigureAwait(false))
                    return info;
                if (deadline.Elapsed > _options.StartTimeout)
                {
                    Stop();
                    throw new LoraloomException(ErrorCodes.Timeout, "the daemon did not publish " + path + " within "
                        + _options.StartTimeout.TotalSeconds + " s:\n" + OutputTail);
                }
                await Task.Delay(100, cancellationToken).ConfigureAwait(false);
            }
        }

        /// <summary>
        /// Stops the daemon this launcher started: a polite request first (SIGTERM on Unix), then a kill
        /// after <see cref="DaemonLauncherOptions.StopGrace"/>. Removes its runtime file if it left one.
        /// Blocks until the process is gone; from a game's main thread use <see cref="StopAsync"/>.
        /// Idempotent (a stop already under way is waited for).
        /// </summary>
        public void Stop()
        {
            Task stopping;
            Process process = Take(out stopping);
            if (process != null) FinishStop(process, AskToStopIfRunning(process));
            else if (stopping != null) stopping.Wait();
        }

        /// <summary>
        /// Stop without blocking: SIGTERM goes out now, and the wait for the exit (with the kill after
        /// the grace period) runs on a pool thread. The Task ends once the process is gone.
        /// </summary>
        public Task StopAsync()
        {
            Task stopping;
            Process process = Take(out stopping);
            if (process == null) return stopping ?? Task.FromResult(true);
            bool asked = AskToStopIfRunning(process);
            Task task = Task.Run(() => FinishStop(process, asked));
            lock (_gate) _stopping = task;
            return task;
        }

        public void Dispose()
        {
            Stop();
            Unhook();
        }

        Process Take(out Task stopping)
        {
            lock (_gate)
            {
                Process process = _process;
                _process = null;
                stopping = _stopping;
                return process;
            }
        }

        static bool AskToStopIfRunning(Process process)
        {
            return !HasExited(process) && AskToStop(process);
        }

        void FinishStop(Process process, bool asked)
        {
            try
            {
                if (!HasExited(process) && (!asked || !process.WaitForExit((int)_options.StopGrace.TotalMilliseconds)))
                {
                    try { process.Kill(); }
                    catch (InvalidOperationException) { }
                    process.WaitForExit(5000);
                }
                Loraloom.Core.RuntimeFile.RemoveIfOwnedBy(RuntimeFilePath, process.Id);
            }
            finally
            {
                process.Dispose();
            }
        }

        Process Start(string runtimeFile)
        {
            var info = new ProcessStartInfo
            {
                FileName = _options.Executable,
                Arguments = JoinArguments(_options.Arguments),
                UseShellExecute = false,
                CreateNoWindow = true,
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                RedirectStandardInput = false,
                WorkingDirectory = _options.WorkingDirectory ?? System.Environment.CurrentDirectory,
            };
            if (_options.RuntimeFile != null) info.EnvironmentVariables[Loraloom.Core.RuntimeFile.EnvironmentVariable] = _options.RuntimeFile;
            foreach (var pair in _options.Environment) info.EnvironmentVariables[pair.Key] = pair.Value;

            var process = new Process { StartInfo = info, EnableRaisingEvents = true };
            // Both pipes are drained all the time: a daemon that fills an unread pipe blocks forever.
            process.OutputDataReceived += (sender, e) => Remember(e.Data);
            process.ErrorDataReceived += (sender, e) => Remember(e.Data);
            try
            {
                process.Start();
            }
            catch (Exception e)
            {
                process.Dispose();
                throw new LoraloomException(ErrorCodes.DaemonNotFound, "cannot start '" + _options.Executable + "': " + e.Message
                    + " (is loraloom installed and on PATH? set the daemon command in LoraloomDaemon)", null, e);
            }
            process.BeginOutputReadLine();
            process.BeginErrorReadLine();
            Process previous;
            lock (_gate)
            {
                previous = _process;
                _process = process;
            }
            if (previous != null) previous.Dispose();
            Hook();
            return process;
        }

        void Remember(string line)
        {
            if (line == null) return;
            lock (_output)
            {
                _output.Enqueue(line);
                while (_output.Count > OutputLines) _output.Dequeue();
            }
        }

        // The game may end without Dispose (a crash in a script, the editor leaving play mode):
        // stop the daemon with the process or the script domain all the same.
        void Hook()
        {
            lock (_gate)
            {
                if (_hooked) return;
                _hooked = true;
            }
            AppDomain.CurrentDomain.ProcessExit += OnExit;
            AppDomain.CurrentDomain.DomainUnload += OnExit;
        }

        void Unhook()
        {
            lock (_gate)
            {
                if (!_hooked) return;
                _hooked = false;
            }
            AppDomain.CurrentDomain.ProcessExit -= OnExit;
            AppDomain.CurrentDomain.DomainUnload -= OnExit;
        }

        void OnExit(object sender, EventArgs e) { Stop(); }

        static async Task<bool> IsListeningAsync(RuntimeInfo info)
        {
            using (var client = new TcpClient())
            {
                try
                {
                    Task connect = client.ConnectAsync(string.IsNullOrEmpty(info.Host) ? "127.0.0.1" : info.Host, info.Port);
                    Task first = await Task.WhenAny(connect, Task.Delay(2000)).ConfigureAwait(false);
                    if (first != connect)
                    {
                        // Observe the abandoned attempt's failure so it is not reported as unobserved.
                        connect.Forget();
                        return false;
                    }
                    await connect.ConfigureAwait(false);
                    return client.Connected;
                }
                catch (SocketException)
                {
                    return false;
                }
                catch (ObjectDisposedException)
                {
                    return false;
                }
            }
        }

        static bool HasExited(Process process)
        {
            try { return process.HasExited; }
            catch (InvalidOperationException) { return true; }
        }

        static string ExitCode(Process process)
        {
            try { return process.ExitCode.ToString(); }
            catch (InvalidOperationException) { return "?"; }
        }

        [DllImport("libc", EntryPoint = "kill", SetLastError = true)]
        static extern int SysKill(int pid, int signal);

        const int SigTerm = 15;

        // SIGTERM lets the daemon finish its requests and remove its runtime file. Windows has no
        // such signal for a console-less child, so there it is killed (and the file removed for it).
        static bool AskToStop(Process process)
        {
            if (RuntimeInformation.IsOSPlatform(OSPlatform.Windows)) return false;
            try
            {
                return SysKill(process.Id, SigTerm) == 0;
            }
            catch (DllNotFoundException)
            {
                return false;
            }
            catch (EntryPointNotFoundException)
            {
                return false;
            }
        }

        /// <summary>One command line from an argv, quoted the way both Windows' and mono's parsers read it back.</summary>
        public static string JoinArguments(IEnumerable<string> arguments)
        {
            var sb = new StringBuilder();
            foreach (string argument in arguments)
            {
                if (sb.Length > 0) sb.Append(' ');
                sb.Append(Quote(argument ?? ""));
            }
            return sb.ToString();
        }

        static string Quote(string argument)
        {
            // Mono on Unix parses shell-style (a bare backslash escapes), Windows by its C runtime's
            // rules; inside double quotes, with backslashes doubled before a quote, both read the same.
            if (argument.Length > 0 && argument.IndexOfAny(new[] { ' ', '\t', '\n', '"', '\'', '\\' }) < 0) return argument;
            var sb = new StringBuilder("\"");
            int backslashes = 0;
            foreach (char c in argument)
            {
                if (c == '\\')
                {
                    backslashes++;
                    continue;
                }
                if (c == '"')
                {
                    sb.Append('\\', backslashes * 2 + 1);
                    sb.Append('"');
                }
                else
                {
                    sb.Append('\\', backslashes);
                    sb.Append(c);
                }
                backslashes = 0;
            }
            sb.Append('\\', backslashes * 2);
            return sb.Append('"').ToString();
        }
    }
}
