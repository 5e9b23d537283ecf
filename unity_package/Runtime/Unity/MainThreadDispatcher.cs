using System;
using System.Collections.Concurrent;
using System.Threading;
using UnityEngine;

namespace Loraloom.Unity
{
    /// <summary>
    /// Runs actions on Unity's main thread. The client calls back on its network thread, where no
    /// Unity API may be touched; components post their callbacks here and they run in the next
    /// frame's Update, in order.
    /// </summary>
    [AddComponentMenu("")]
    public sealed class MainThreadDispatcher : MonoBehaviour
    {
        static readonly ConcurrentQueue<Action> Pending = new ConcurrentQueue<Action>();
        static int _mainThreadId = -1;
        static MainThreadDispatcher _instance;

        /// <summary>True on the thread that runs Unity's player loop.</summary>
        public static bool IsMainThread { get { return Thread.CurrentThread.ManagedThreadId == _mainThreadId; } }

        /// <summary>Queues <paramref name="action"/> for the main thread (safe from any thread).</summary>
        public static void Post(Action action)
        {
            if (action == null) return;
            Pending.Enqueue(action);
        }

        /// <summary>Runs <paramref name="action"/> now when already on the main thread, else queues it.</summary>
        public static void Run(Action action)
        {
            if (IsMainThread) action();
            else Post(action);
        }

        // With "enter play mode options" the domain is not reloaded: statics must be reset by hand.
        [RuntimeInitializeOnLoadMethod(RuntimeInitializeLoadType.SubsystemRegistration)]
        static void ResetStatics()
        {
            Action dropped;
            while (Pending.TryDequeue(out dropped)) { }
            _instance = null;
        }

        [RuntimeInitializeOnLoadMethod(RuntimeInitializeLoadType.BeforeSceneLoad)]
        static void Install()
        {
            _mainThreadId = Thread.CurrentThread.ManagedThreadId;
            if (_instance != null) return;
            var host = new GameObject("[Loraloom main thread]") { hideFlags = HideFlags.HideAndDontSave };
            DontDestroyOnLoad(host);
            _instance = host.AddComponent<MainThreadDispatcher>();
        }

        void Update()
        {
            // Only what was queued before this frame: an action that posts again runs next frame.
            int budget = Pending.Count;
            Action action;
            while (budget-- > 0 && Pending.TryDequeue(out action))
            {
                try
                {
                    action();
                }
                catch (Exception e)
                {
                    Debug.LogException(e);
                }
            }
        }

        void OnDestroy()
        {
            if (_instance == this) _instance = null;
        }
    }
}
