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
    [DisallowMultipleComponent]
    [AddComponentMenu("Loraloom/Loraloom Daemon")]
    public sealed class LoraloomDaemon : MonoBehaviour
    {
        const int RecentEventCount = 200;

        [Header("Finding the daemon")]
        [Tooltip("Start the daemon with the command below when no running daemon is found.")]
        [SerializeField] bool launchIfNotRunning = true;
        [Tooltip("The command that starts a daemon; the runtime file tells us its port and token.")]
        [SerializeField] string command = "loraloom serve --port 0";
        [Tooltip("Runtime file to read (and to ask a started daemon to write). Empty: the default location.")]
        [SerializeField] string runtimeFile = "";
        [Tooltip("Seconds to wait for a started daemon to load its models.")]
        [SerializeField] float startTimeoutSeconds = 120f;

        [Header("Or connect explicitly")]
        [Tooltip("ws://host:port of a daemon; empty uses the runtime file.")]
        [SerializeField] string url = "";
        [SerializeField] string token = "";

        [Header("Behaviour")]
        [SerializeField] string clientName = "unity";
        [SerializeField] bool keepAcrossScenes = true;

        [Header("Events (main thread)")]
        public UnityEvent Connected = new UnityEvent();
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
                if (_instance == null) _instance = FindObjectOfType<LoraloomDaemon>();
                return _instance;
            }
        }

        /// <summary>The connected client, or null until <see cref="Ready"/> completes.</summary>
        public LoraloomClient Client { get { return _client; } }

        /// <summary>Completes with the client once connected; faults with the reason if that fails.</summary>
        public Task<LoraloomClient> Ready
        {
            get
            {
                if (_ready == null) _ready = ConnectAsync();
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
            if (enabled) Observe(Ready);
        }

        async Task<LoraloomClient> ConnectAsync()
        {
            var options = new LoraloomClientOptions { ClientName = clientName };
            if (!string.IsNullOrEmpty(runtimeFile)) options.RuntimeFile = runtimeFile;
            if (!string.IsNullOrEmpty(url))
            {
                options.Url = url;
                options.Token = token;
            }
            else if (launchIfNotRunning)
            {
                SetStatus("looking for the daemon");
                var launchOptions = DaemonLauncherOptions.FromCommandLine(command);
                launchOptions.RuntimeFile = options.RuntimeFile;
                launchOptions.StartTimeout = TimeSpan.FromSeconds(startTimeoutSeconds);
                _launcher = new DaemonLauncher(launchOptions);
                // Off the main thread: waiting for a model to load must not freeze the game.
                DaemonLauncher launcher = _launcher;
                RuntimeInfo info = await Task.Run(() => launcher.EnsureRunningAsync(_lifetime.Token));
                options.RuntimeFile = launcher.RuntimeFilePath;
                SetStatus(launcher.OwnsProcess ? "started the daemon (pid " + info.Pid + ")" : "found the daemon at " + info.Url);
            }
            SetStatus("connecting");
            LoraloomClient client = await LoraloomClient.ConnectAsync(options, _lifetime.Token);
            if (this == null)
            {
                client.Dispose();
                throw new OperationCanceledException("the LoraloomDaemon was destroyed while connecting");
            }
            _client = client;
            client.StateChanged += state => MainThreadDispatcher.Post(() => OnStateChanged(state));
            client.AdapterChanged += e => MainThreadDispatcher.Post(() => OnAdapterChanged(e));
            client.HandlerFailed += Debug.LogException;
            SetStatus("connected to loraloom " + client.Welcome.Server);
            Connected.Invoke();
            return client;
        }

        void Observe(Task<LoraloomClient> ready)
        {
            ready.ContinueWith(t =>
            {
                if (t.IsFaulted)
                {
                    Exception error = t.Exception.GetBaseException();
                    SetStatus("failed: " + error.Message);
                    Debug.LogError("loraloom: cannot connect to the daemon: " + error.Message
                        + (DaemonOutput.Length > 0 ? "\n" + DaemonOutput : ""), this);
                    ConnectionFailed.Invoke(error.Message);
                }
            }, TaskScheduler.FromCurrentSynchronizationContext());
        }

        void OnStateChanged(ConnectionState state)
        {
            if (this == null) return;
            SetStatus(state == ConnectionState.Connected ? "connected" : state.ToString().ToLowerInvariant());
            Remember("connection " + state.ToString().ToLowerInvariant());
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

        void OnApplicationQuit() { Shutdown(); }

        void OnDestroy()
        {
            Shutdown();
            if (_instance == this) _instance = null;
        }

        void Shutdown()
        {
            _lifetime.Cancel();
            if (_client != null)
            {
                _client.Dispose();
                _client = null;
            }
            if (_launcher != null)
            {
                // Stops the daemon only if this component started it.
                _launcher.Dispose();
                _launcher = null;
            }
        }
    }
}
