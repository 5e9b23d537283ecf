using System;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;
using Loraloom.Core;
using UnityEngine;
using UnityEngine.Events;

namespace Loraloom.Unity
{
    /// <summary>
    /// Owns the game's one connection to the loraloom daemon: finds it through the runtime file,
    /// starts it when none runs (and stops what it started when the game ends), and reconnects.
    /// NPCs and image components find it through <see cref="Instance"/> unless given one.
    /// </summary>
    /// <remarks>
    /// Life cycle: lines asked before the daemon is up wait for it (a daemon this component starts
    /// gets <c>startTimeoutSeconds</c> to load, then the connection <c>RequestConnectWait</c>, 30 s).
    /// When the connection drops (the daemon stopped, said <c>shutting_down</c>, or was killed)
    /// the client reconnects with backoff, re-reading the runtime file; lines that were streaming
    /// fail with <c>shutting_down</c> or <c>connection_closed</c>, the others (not yet sent, or not
    /// yet answered at all) wait and go out on the new connection. A failed start is not final: the
    /// next <see cref="Ready"/> tries again.
    /// <para>Which daemon it starts: in the editor, the command's program (the developer's
    /// <c>loraloom</c> on PATH). In a player build, the runtime the build carries
    /// (<c>StreamingAssets/Loraloom/runtime/loraloom[.exe] serve --pack StreamingAssets/Loraloom/pack</c>
    /// plus the command's other words; see Loraloom.Editor's build step), else the command's program
    /// as in the editor. When the game quits, a daemon this component started is stopped (SIGTERM,
    /// then a kill after <c>stopGraceSeconds</c>); a player waits for that before it exits.</para>
    /// </remarks>
    [DisallowMultipleComponent]
    [AddComponentMenu("Loraloom/Loraloom Daemon")]
    public sealed class LoraloomDaemon : MonoBehaviour
    {
        const int RecentEventCount = 200;
#if UNITY_ANDROID || UNITY_IOS
        // A phone runs no local daemon and starts no processes: only a remote daemon, by URL.
        static readonly bool LocalDaemon = false;
#else
        static readonly bool LocalDaemon = true;
#endif

        [Header("Finding the daemon")]
        [Tooltip("Start the daemon with the command below when no running daemon is found.")]
        [SerializeField] bool launchIfNotRunning = true;
        [Tooltip("The command that starts a daemon; the runtime file tells us its port and token.")]
        [SerializeField] string command = "loraloom serve --port 0";
        [Tooltip("Runtime file to read (and to ask a started daemon to write). Empty: the default location.")]
        [SerializeField] string runtimeFile = "";
        [Tooltip("Seconds to wait for a started daemon to load its models.")]
        [SerializeField] float startTimeoutSeconds = 120f;
        [Tooltip("Seconds a started daemon gets to stop after SIGTERM before it is killed.")]
        [SerializeField] float stopGraceSeconds = 10f;
        [Tooltip("In a player build, start the runtime the build carries (StreamingAssets/Loraloom/runtime) with its pack, instead of the command's program.")]
        [SerializeField] bool useBundledRuntime = true;

        [Header("Or connect explicitly")]
        [Tooltip("ws://host:port of a daemon (a remote one, for mobile); empty uses the runtime file.")]
        [SerializeField] string url = "";
        [SerializeField] string token = "";

        [Header("Behaviour")]
        [SerializeField] string clientName = "unity";
        [Tooltip("Seconds a line waits for the connection (the daemon is starting or restarting) before it fails.")]
        [SerializeField] float requestConnectWaitSeconds = 30f;
        [SerializeField] bool keepAcrossScenes = true;

        [Header("Events (main thread)")]
        [Tooltip("Every successful handshake: the first and each reconnection.")]
        public UnityEvent Connected = new UnityEvent();
        [Tooltip("An established connection closed; the reason.")]
        public UnityEvent<string> Disconnected = new UnityEvent<string>();
        [Tooltip("A handshake after a dropped connection (Connected fired just before).")]
        public UnityEvent Reconnected = new UnityEvent();
        [Tooltip("An attempt to start or reach the daemon failed; the reason. Attempts go on.")]
        public UnityEvent<string> ConnectionFailed = new UnityEvent<string>();

        static LoraloomDaemon _instance;
        readonly CancellationTokenSource _lifetime = new CancellationTokenSource();
        readonly List<string> _recentEvents = new List<string>();
        DaemonLauncher _launcher;
        LoraloomClient _client;
        Task<LoraloomClient> _ready;
        string _status = "not started";

        /// <summary>The active daemon component (the first one enabled).</summary>
        public static LoraloomDaemon Instance
        {
            get
            {
                if (_instance == null)
                {
#if UNITY_2023_1_OR_NEWER
                    _instance = FindFirstObjectByType<LoraloomDaemon>();
#else
                    _instance = FindObjectOfType<LoraloomDaemon>();
#endif
                }
                return _instance;
            }
        }

        /// <summary>The client, or null until the daemon was found or started.</summary>
        public LoraloomClient Client { get { return _client; } }

        /// <summary>
        /// Completes with the client once it is connected; faults with the reason when the daemon
        /// cannot be started or reached in time. A faulted Ready is not kept: reading it again tries
        /// again. Read it on the main thread.
        /// </summary>
        public Task<LoraloomClient> Ready
        {
            get
            {
                if (_ready == null || _ready.IsFaulted || _ready.IsCanceled)
                {
                    _ready = ConnectAsync();
                    Observe(_ready);
                }
                return _ready;
            }
        }

        public string Status { get { return _status; } }

        /// <summary>Whether this component started the daemon process (and will stop it).</summary>
        public bool LaunchedDaemon { get { return _launcher != null && _launcher.OwnsProcess; } }

        /// <summary>The last lines a started daemon printed.</summary>
        public string DaemonOutput { get { return _launcher != null ? _launcher.OutputTail : ""; } }

        /// <summary>Adapter events raised on the main thread.</summary>
        public event Action<AdapterEvent> AdapterChanged;

        /// <summary>A snapshot of the latest events (adapter changes, connection changes) for tools.</summary>
        public string[] RecentEvents
        {
            get
            {
                lock (_recentEvents) return _recentEvents.ToArray();
            }
        }

        // With "enter play mode options" the domain is not reloaded: forget the last session's instance.
        [RuntimeInitializeOnLoadMethod(RuntimeInitializeLoadType.SubsystemRegistration)]
        static void ResetStatics() { _instance = null; }

        void Awake()
        {
            if (_instance != null && _instance != this)
            {
                Debug.LogWarning("loraloom: a second LoraloomDaemon was disabled; NPCs share the first one.", this);
                enabled = false;
                return;
            }
            _instance = this;
            if (keepAcrossScenes && transform.parent == null) DontDestroyOnLoad(gameObject);
        }

        void Start()
        {
            // Finding (or starting) the daemon begins now, not at the first line.
            if (enabled) GC.KeepAlive(Ready);
        }

        async Task<LoraloomClient> ConnectAsync()
        {
            if (_client == null)
            {
                var options = new LoraloomClientOptions
                {
                    ClientName = clientName,
                    RequestConnectWait = TimeSpan.FromSeconds(Math.Max(0f, requestConnectWaitSeconds)),
                };
                if (!string.IsNullOrEmpty(runtimeFile)) options.RuntimeFile = runtimeFile;
                if (!string.IsNullOrEmpty(url))
                {
                    options.Url = url;
                    options.Token = token;
                }
                else if (!LocalDaemon)
                {
                    throw new LoraloomException(ErrorCodes.DaemonNotFound,
                        "on this platform set Url and Token to a daemon on another machine (loraloom serve --host ...)");
                }
                else if (launchIfNotRunning)
                {
                    SetStatus("looking for the daemon");
                    if (_launcher == null)
                    {
                        DaemonLauncherOptions launchOptions = LaunchOptions();
                        launchOptions.RuntimeFile = options.RuntimeFile;
                        launchOptions.StartTimeout = TimeSpan.FromSeconds(startTimeoutSeconds);
                        launchOptions.StopGrace = TimeSpan.FromSeconds(Math.Max(0f, stopGraceSeconds));
                        _launcher = new DaemonLauncher(launchOptions);
                    }
                    // Off the main thread: waiting for a model to load must not freeze the game.
                    DaemonLauncher launcher = _launcher;
                    RuntimeInfo info;
                    try
                    {
                        info = await Task.Run(() => launcher.EnsureRunningAsync(_lifetime.Token));
                    }
                    catch (LoraloomException e)
                    {
                        if (e.Code != ErrorCodes.DaemonNotFound || Application.isEditor || !useBundledRuntime) throw;
                        throw new LoraloomException(e.Code, e.Reason + " (this build carries no runtime at "
                            + BundledRuntime.ExecutablePath(BundledRuntimeRoot) + ": set the runtime and pack folders in Project Settings > Loraloom and build again)", null, e);
                    }
                    options.RuntimeFile = launcher.RuntimeFilePath;
                    SetStatus(launcher.OwnsProcess ? "started the daemon (pid " + info.Pid + ")" : "found the daemon at " + info.Url);
                }
                if (this == null) throw new OperationCanceledException("the LoraloomDaemon was destroyed while starting");
                SetStatus("connecting");
                _client = LoraloomClient.Open(options, client =>
                {
                    client.StateChanged += state => MainThreadDispatcher.Post(() => OnStateChanged(state));
                    client.Connected += welcome => MainThreadDispatcher.Post(() => Raise(Connected, "connected to loraloom " + welcome.Server));
                    client.Reconnected += welcome => MainThreadDispatcher.Post(() => Raise(Reconnected, "reconnected"));
                    client.Disconnected += (code, why) => MainThreadDispatcher.Post(() => Raise(Disconnected, why, "disconnected (" + code + ")"));
                    client.ConnectionFailed += e => MainThreadDispatcher.Post(() => Raise(ConnectionFailed, e.Message, "connection failed"));
                    client.AdapterChanged += e => MainThreadDispatcher.Post(() => OnAdapterChanged(e));
                    client.HandlerFailed += Debug.LogException;
                });
            }
            await _client.WaitUntilConnectedAsync(_lifetime.Token);
            return _client;
        }

        /// <summary>Where a player build carries the runtime and the pack.</summary>
        public static string BundledRuntimeRoot { get { return BundledRuntime.Root(Application.streamingAssetsPath); } }

        /// <summary>The daemon this component starts: the build's runtime in a player, else the command.</summary>
        DaemonLauncherOptions LaunchOptions()
        {
            DaemonLauncherOptions fromCommand = DaemonLauncherOptions.FromCommandLine(command);
            if (Application.isEditor || !useBundledRuntime) return fromCommand;
            DaemonLauncherOptions bundled = BundledRuntime.LaunchOptions(BundledRuntimeRoot, fromCommand.Arguments);
            if (bundled == null) return fromCommand;
            Remember("starting the bundled runtime " + bundled.Executable);
            return bundled;
        }

        void Observe(Task<LoraloomClient> ready)
        {
            ready.ContinueWith(t =>
            {
                if (t.IsFaulted && this != null)
                {
                    Exception error = t.Exception.GetBaseException();
                    SetStatus("failed: " + error.Message);
                    Debug.LogError("loraloom: cannot connect to the daemon: " + error.Message
                        + (DaemonOutput.Length > 0 ? "\n" + DaemonOutput : ""), this);
                    // Attempts of a client that exists are reported as they fail; a start that failed here is not.
                    if (_client == null) ConnectionFailed.Invoke(error.Message);
                }
            }, TaskScheduler.FromCurrentSynchronizationContext());
        }

        void Raise(UnityEvent handler, string what)
        {
            if (this == null) return;
            Remember(what);
            handler.Invoke();
        }

        void Raise(UnityEvent<string> handler, string reason, string what)
        {
            if (this == null) return;
            Remember(what + ": " + reason);
            handler.Invoke(reason);
        }

        void OnStateChanged(ConnectionState state)
        {
            if (this == null) return;
            SetStatus(state == ConnectionState.Connected ? "connected" : state.ToString().ToLowerInvariant());
        }

        void OnAdapterChanged(AdapterEvent e)
        {
            if (this == null) return;
            Remember("adapter " + e);
            Action<AdapterEvent> handler = AdapterChanged;
            if (handler != null) handler(e);
        }

        void SetStatus(string status) { _status = status; }

        void Remember(string line)
        {
            lock (_recentEvents)
            {
                _recentEvents.Add(DateTime.Now.ToString("HH:mm:ss") + "  " + line);
                if (_recentEvents.Count > RecentEventCount) _recentEvents.RemoveAt(0);
            }
        }

        // The game ends here: a player waits for the daemon it started to be gone (the editor only
        // leaves play mode, and must not freeze for the grace period).
        void OnApplicationQuit() { Shutdown(!Application.isEditor); }

        void OnDestroy()
        {
            Shutdown(false);
            if (_instance == this) _instance = null;
        }

        void Shutdown(bool waitForExit)
        {
            _lifetime.Cancel();
            if (_client != null)
            {
                _client.Dispose();
                _client = null;
            }
            if (_launcher != null)
            {
                // Stops the daemon only if this component started it: SIGTERM now, and the wait for
                // its exit (a kill after the grace period) on a pool thread, never on the main thread.
                DaemonLauncher launcher = _launcher;
                _launcher = null;
                Task stopped = launcher.StopAsync().ContinueWith(t => launcher.Dispose());
                if (waitForExit) stopped.Wait(TimeSpan.FromSeconds(Math.Max(0f, stopGraceSeconds) + 6));
            }
        }
    }
}
