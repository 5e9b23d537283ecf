using System;
using System.Collections.Generic;
using System.Threading.Tasks;
using Loraloom.Core;
using UnityEngine;
using UnityEngine.Events;
using UnityEngine.LowLevel;

namespace Loraloom.Unity
{
    /// <summary>
    /// How much of the GPU the daemon may take while the game runs, and the game's frame starts
    /// reported from the player loop, so the daemon runs its steps in the part of each frame the
    /// game leaves free. Add it next to the <see cref="LoraloomDaemon"/>; every limit is off until
    /// set, and disabling the component lifts the budget.
    /// </summary>
    /// <remarks>
    /// The budget goes out when the daemon is ready and again on every reconnection (the daemon ends
    /// a client's budget with its connection; <see cref="LoraloomClient.SetBudgetAsync"/> keeps it).
    /// With <see cref="frameSync"/>, a system at the start of the player loop's Initialization
    /// phase (after Unity waited for the last frame's presentation) sends a few-byte <c>frame</c>
    /// message each frame; the daemon then keeps <see cref="gameGpuMs"/> from each frame's start for
    /// the game and runs its steps in the rest, less <see cref="marginMs"/> (plus
    /// <see cref="overlapMs"/>, how far a step may run into the next frame). With
    /// <see cref="reportMeasuredGpuTime"/> each frame message also carries the GPU time Unity's
    /// FrameTimingManager measured for the last frame (where "Frame Timing Stats" is on in Player
    /// settings), and the daemon takes the game's part from those instead. Change the fields at run
    /// time and call <see cref="Apply"/> (the inspector does it for you in play mode).
    /// </remarks>
    [DisallowMultipleComponent]
    [AddComponentMenu("Loraloom/Loraloom GPU Budget")]
    public sealed class LoraloomGpuBudget : MonoBehaviour
    {
        [Tooltip("Leave empty to use LoraloomDaemon.Instance.")]
        [SerializeField] LoraloomDaemon daemon;

        [Header("Duty cap")]
        [Tooltip("The fraction of wall time the daemon's GPU work may occupy; 0: no cap.")]
        [Range(0f, 1f)] public float dutyCap = 0f;

        [Header("Tokens per second (0: no cap)")]
        [Tooltip("Lines asked with LinePriority.Player.")]
        [Min(0f)] public float playerTokensPerSecond = 0f;
        [Tooltip("Lines asked with LinePriority.Normal.")]
        [Min(0f)] public float normalTokensPerSecond = 0f;
        [Tooltip("Lines asked with LinePriority.Background (ambient chatter).")]
        [Min(0f)] public float backgroundTokensPerSecond = 0f;

        [Header("Frame sync")]
        [Tooltip("Report each frame's start and let the daemon work only in the part of the frame the game leaves free.")]
        public bool frameSync = false;
        [Tooltip("The frame time in ms: 16.7 at 60 Hz, 8.3 at 120 Hz.")]
        [Range(1f, 1000f)] public float framePeriodMs = 16.7f;
        [Tooltip("GPU time the game's own rendering takes from a frame's start, in ms; used until the daemon has the game's measured times (see reportMeasuredGpuTime).")]
        [Range(0f, 1000f)] public float gameGpuMs = 8f;
        [Tooltip("Send each frame the GPU time Unity measured for the last one (FrameTimingManager), so the daemon sizes the game's part of a frame from the measured times instead of gameGpuMs. Needs \"Frame Timing Stats\" enabled in Player settings (and a platform and graphics API that measure GPU time); without it gameGpuMs applies.")]
        public bool reportMeasuredGpuTime = true;
        [Tooltip("Kept free before the next frame starts, in ms.")]
        [Range(0f, 100f)] public float marginMs = 0.5f;
        [Tooltip("How far past the margin an engine step may run into the next frame, in ms: that frame then shares the GPU for up to this long (a little slower while the game's frame is well under the period). 0: never.")]
        [Range(0f, 100f)] public float overlapMs = 0f;

        [Header("Steps")]
        [Tooltip("The longest engine step while a budget is set, in ms (prompt chunks shrink to fit); 0: the daemon's own.")]
        [Min(0f)] public float maxStepMs = 0f;

        [Header("Events (main thread)")]
        [Tooltip("The daemon's answer each time the budget was applied (on connect and every reconnection).")]
        public UnityEvent<Budget> BudgetApplied = new UnityEvent<Budget>();
        [Tooltip("The budget could not be applied; the reason.")]
        public UnityEvent<string> BudgetFailed = new UnityEvent<string>();

        static readonly List<LoraloomGpuBudget> Active = new List<LoraloomGpuBudget>();
        LoraloomClient _client;
        Budget _inForce;

        public LoraloomDaemon Daemon
        {
            get { return daemon != null ? daemon : LoraloomDaemon.Instance; }
            set { daemon = value; }
        }

        /// <summary>The daemon's last answer: the budget in force for this game (null before the first).</summary>
        public Budget InForce { get { return _inForce; } }

        /// <summary>The <c>set_budget</c> the fields describe (nothing set: an empty one, no budget).</summary>
        public SetBudget ToMessage()
        {
            var budget = new SetBudget();
            if (dutyCap > 0f) budget.DutyCap = Math.Min(1.0, dutyCap);
            if (playerTokensPerSecond > 0f || normalTokensPerSecond > 0f || backgroundTokensPerSecond > 0f)
            {
                budget.TokensPerS = new TokenRates
                {
                    Player = Rate(playerTokensPerSecond),
                    Normal = Rate(normalTokensPerSecond),
                    Background = Rate(backgroundTokensPerSecond),
                };
            }
            if (frameSync)
                budget.FrameSync = new FrameSync { PeriodMs = framePeriodMs, GameMs = gameGpuMs, MarginMs = marginMs, OverlapMs = overlapMs };
            if (maxStepMs > 0f) budget.MaxStepMs = Math.Max(0.5, maxStepMs);
            return budget;
        }

        /// <summary>
        /// Sends the fields' budget (once the daemon is ready) and returns the daemon's answer; it is
        /// kept for reconnections. Faults, after <see cref="BudgetFailed"/>, when it cannot be applied.
        /// </summary>
        public async Task<Budget> Apply()
        {
            SetBudget budget = ToMessage();
            LoraloomDaemon owner = Daemon;
            try
            {
                if (owner == null) throw new LoraloomException(ErrorCodes.DaemonNotFound, "no LoraloomDaemon in the scene");
                LoraloomClient client = await owner.Ready;
                Watch(client);
                Budget reply = await client.SetBudgetAsync(budget);
                if (this != null) _inForce = reply;
                return reply;
            }
            catch (Exception e)
            {
                if (this != null) BudgetFailed.Invoke(e.Message);
                throw;
            }
        }

        void OnEnable()
        {
            lock (Active)
            {
                if (Active.Count == 0) FrameReporter.Install();
                if (!Active.Contains(this)) Active.Add(this);
            }
            Apply().ContinueWith(t => t.Exception, TaskContinuationOptions.OnlyOnFaulted); // reported by BudgetFailed
        }

        void OnDisable()
        {
            lock (Active)
            {
                Active.Remove(this);
                if (Active.Count == 0) FrameReporter.Remove();
            }
            // Lift the budget on a client that stays (a destroyed daemon's connection ends it anyway).
            LoraloomClient client = _client;
            if (client != null && client.State != ConnectionState.Closed)
                client.SetBudgetAsync(null).ContinueWith(t => t.Exception, TaskContinuationOptions.OnlyOnFaulted);
            Unwatch();
        }

        void OnValidate()
        {
            if (Application.isPlaying && isActiveAndEnabled && _client != null)
                Apply().ContinueWith(t => t.Exception, TaskContinuationOptions.OnlyOnFaulted);
        }

        void Watch(LoraloomClient client)
        {
            if (_client == client) return;
            Unwatch();
            _client = client;
            client.BudgetApplied += OnBudgetApplied;
            client.BudgetFailed += OnBudgetFailed;
        }

        void Unwatch()
        {
            if (_client == null) return;
            _client.BudgetApplied -= OnBudgetApplied;
            _client.BudgetFailed -= OnBudgetFailed;
            _client = null;
        }

        // Network thread: to the main thread, dropped once the component is gone.
        void OnBudgetApplied(Budget budget)
        {
            MainThreadDispatcher.Post(() =>
            {
                if (this == null) return;
                _inForce = budget;
                BudgetApplied.Invoke(budget);
            });
        }

        void OnBudgetFailed(LoraloomException error)
        {
            MainThreadDispatcher.Post(() =>
            {
                if (this != null) BudgetFailed.Invoke(error.Message);
            });
        }

        static double? Rate(float perSecond) { return perSecond > 0f ? (double?)perSecond : null; }

        // With "enter play mode options" the domain is not reloaded: forget the last session's components.
        [RuntimeInitializeOnLoadMethod(RuntimeInitializeLoadType.SubsystemRegistration)]
        static void ResetStatics()
        {
            lock (Active) Active.Clear();
            FrameReporter.Remove();
        }

        /// <summary>The player loop system that reports frame starts for every enabled budget with frame sync.</summary>
        static class FrameReporter
        {
            static bool _installed;

            public static void Install()
            {
                if (_installed) return;
                PlayerLoopSystem root = PlayerLoop.GetCurrentPlayerLoop();
                var mine = new PlayerLoopSystem { type = typeof(LoraloomGpuBudget), updateDelegate = FrameStarted };
                if (!Insert(ref root, mine)) return;
                PlayerLoop.SetPlayerLoop(root);
                _installed = true;
            }

            public static void Remove()
            {
                if (!_installed) return;
                PlayerLoopSystem root = PlayerLoop.GetCurrentPlayerLoop();
                Strip(ref root);
                PlayerLoop.SetPlayerLoop(root);
                _installed = false;
            }

            static void FrameStarted()
            {
                lock (Active)
                {
                    double? measured = null;
                    bool measuredYet = false;
                    for (int i = 0; i < Active.Count; i++)
                    {
                        LoraloomGpuBudget budget = Active[i];
                        if (!budget.frameSync || budget._client == null) continue;
                        if (budget.reportMeasuredGpuTime && !measuredYet)
                        {
                            measured = LastGpuFrameMs();
                            measuredYet = true;
                        }
                        budget._client.ReportFrame(budget.reportMeasuredGpuTime ? measured : null);
                    }
                }
            }

            static readonly FrameTiming[] Timings = new FrameTiming[1];

            /// <summary>
            /// The GPU time of the last frame Unity measured, in ms; null where it measures none
            /// (Frame Timing Stats off, or a platform or graphics API without GPU timings).
            /// </summary>
            static double? LastGpuFrameMs()
            {
                try
                {
                    FrameTimingManager.CaptureFrameTimings();
                    if (FrameTimingManager.GetLatestTimings(1, Timings) < 1) return null;
                    double ms = Timings[0].gpuFrameTime;
                    return ms > 0.0 ? (double?)ms : null;
                }
                catch (Exception)
                {
                    return null; // nothing thrown into the player loop; the daemon keeps gameGpuMs
                }
            }

            // First in Initialization: right after Unity's TimeUpdate waited for the last frame's presentation.
            static bool Insert(ref PlayerLoopSystem root, PlayerLoopSystem mine)
            {
                PlayerLoopSystem[] phases = root.subSystemList;
                if (phases == null) return false;
                for (int i = 0; i < phases.Length; i++)
                {
                    if (phases[i].type != typeof(UnityEngine.PlayerLoop.Initialization)) continue;
                    var systems = new List<PlayerLoopSystem>(phases[i].subSystemList ?? new PlayerLoopSystem[0]);
                    systems.Insert(0, mine);
                    phases[i].subSystemList = systems.ToArray();
                    return true;
                }
                return false;
            }

            static void Strip(ref PlayerLoopSystem system)
            {
                if (system.subSystemList == null) return;
                var kept = new List<PlayerLoopSystem>();
                foreach (PlayerLoopSystem child in system.subSystemList)
                {
                    if (child.type == typeof(LoraloomGpuBudget)) continue;
                    PlayerLoopSystem copy = child;
                    Strip(ref copy);
                    kept.Add(copy);
                }
                system.subSystemList = kept.ToArray();
            }
        }
    }
}
