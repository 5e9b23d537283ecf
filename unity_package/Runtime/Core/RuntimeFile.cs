using System;
using System.Collections.Generic;
using System.IO;
using System.Runtime.InteropServices;

namespace Loraloom.Core
{
    /// <summary>What a running daemon publishes about itself in its runtime file.</summary>
    public sealed class RuntimeInfo
    {
        public string Url;
        public string Host;
        public int Port;
        public string Token;
        public int Pid;
        public string Version;
        public int Protocol;

        public override string ToString() { return Url + " (pid " + Pid + ", loraloom " + Version + ")"; }
    }

    /// <summary>
    /// Finds the daemon the way bridge/discovery.py does. The runtime file's location, in order:
    /// $LORALOOM_RUNTIME_FILE; Windows %LOCALAPPDATA%\loraloom\daemon.json; macOS
    /// ~/Library/Application Support/loraloom/daemon.json; elsewhere
    /// $XDG_RUNTIME_DIR/loraloom/daemon.json, or ~/.local/state/loraloom/daemon.json without it.
    /// </summary>
    public static class RuntimeFile
    {
        public const string EnvironmentVariable = "LORALOOM_RUNTIME_FILE";

        public static string DefaultPath()
        {
            string overridePath = Environment.GetEnvironmentVariable(EnvironmentVariable);
            if (!string.IsNullOrEmpty(overridePath)) return overridePath;
            string baseDir;
            if (RuntimeInformation.IsOSPlatform(OSPlatform.Windows))
            {
                baseDir = Environment.GetEnvironmentVariable("LOCALAPPDATA");
                if (string.IsNullOrEmpty(baseDir)) baseDir = Path.Combine(Path.Combine(Home(), "AppData"), "Local");
            }
            else if (RuntimeInformation.IsOSPlatform(OSPlatform.OSX))
            {
                baseDir = Path.Combine(Path.Combine(Home(), "Library"), "Application Support");
            }
            else
            {
                string xdg = Environment.GetEnvironmentVariable("XDG_RUNTIME_DIR");
                baseDir = !string.IsNullOrEmpty(xdg) ? xdg : Path.Combine(Path.Combine(Home(), ".local"), "state");
            }
            return Path.Combine(Path.Combine(baseDir, "loraloom"), "daemon.json");
        }

        /// <summary>Reads the runtime file (the default one when <paramref name="path"/> is null).</summary>
        /// <exception cref="LoraloomException">daemon_not_found, saying why.</exception>
        public static RuntimeInfo Read(string path = null)
        {
            path = path ?? DefaultPath();
            string text;
            try
            {
                text = File.ReadAllText(path);
            }
            catch (FileNotFoundException)
            {
                throw NotFound("no daemon is running (no runtime file at " + path + "); start one with `loraloom serve`");
            }
            catch (DirectoryNotFoundException)
            {
                throw NotFound("no daemon is running (no runtime file at " + path + "); start one with `loraloom serve`");
            }
            catch (Exception e)
            {
                if (e is IOException || e is UnauthorizedAccessException)
                    throw NotFound("cannot read the runtime file " + path + ": " + e.Message);
                throw;
            }
            try
            {
                var data = (Dictionary<string, object>)Json.Parse(text);
                return new RuntimeInfo
                {
                    Url = Text(data, "url"),
                    Host = Text(data, "host"),
                    Port = checked((int)Number(data, "port")),
                    Token = Text(data, "token"),
                    Pid = checked((int)Number(data, "pid")),
                    Version = Text(data, "version"),
                    Protocol = checked((int)Number(data, "protocol")),
                };
            }
            catch (Exception e)
            {
                if (e is FormatException || e is InvalidCastException || e is KeyNotFoundException
                    || e is OverflowException || e is NullReferenceException)
                    throw NotFound("the runtime file " + path + " is malformed: " + e.Message);
                throw;
            }
        }

        public static bool TryRead(string path, out RuntimeInfo info)
        {
            try
            {
                info = Read(path);
                return true;
            }
            catch (LoraloomException)
            {
                info = null;
                return false;
            }
        }

        /// <summary>Removes the runtime file if it still names <paramref name="pid"/> (a daemon that died without cleaning up).</summary>
        public static void RemoveIfOwnedBy(string path, int pid)
        {
            RuntimeInfo info;
            if (TryRead(path, out info) && info.Pid == pid)
            {
                try { File.Delete(path); }
                catch (IOException) { }
                catch (UnauthorizedAccessException) { }
            }
        }

        static string Home()
        {
            // Python's Path.home() is USERPROFILE on Windows and $HOME elsewhere.
            if (RuntimeInformation.IsOSPlatform(OSPlatform.Windows))
                return Environment.GetFolderPath(Environment.SpecialFolder.UserProfile);
            string home = Environment.GetEnvironmentVariable("HOME");
            if (!string.IsNullOrEmpty(home)) return home;
            return Environment.GetFolderPath(Environment.SpecialFolder.UserProfile);
        }

        static string Text(Dictionary<string, object> data, string key)
        {
            object value = data[key];
            if (value == null) throw new FormatException("'" + key + "' is null");
            var s = value as string;
            return s ?? Convert.ToString(value, System.Globalization.CultureInfo.InvariantCulture);
        }

        static long Number(Dictionary<string, object> data, string key)
        {
            object value = data[key];
            if (value is long) return (long)value;
            var s = value as string;
            if (s != null) return long.Parse(s, System.Globalization.CultureInfo.InvariantCulture);
            throw new FormatException("'" + key + "' is not an integer");
        }

        static LoraloomException NotFound(string message) { return new LoraloomException(ErrorCodes.DaemonNotFound, message); }
    }
}
