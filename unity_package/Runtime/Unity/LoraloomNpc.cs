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
    /// One conversation: a character with its own adapter, system prompt and history. Many NPCs share
    /// one <see cref="LoraloomDaemon"/>; their requests run at the same time and the daemon batches
    /// them across adapters.
    /// </summary>
    /// <remarks>
    /// Events fire on the main thread. After the component is destroyed nothing fires, and a request
    /// in flight is cancelled on the daemon.
    /// </remarks>
    [AddComponentMenu("Loraloom/Loraloom NPC")]
    public sealed class LoraloomNpc : MonoBehaviour
    {
        [Tooltip("Leave empty to use LoraloomDaemon.Instance.")]
        [SerializeField] LoraloomDaemon daemon;

        [Header("Voice")]
        [Tooltip("The adapter this character speaks with; empty is the base model.")]
        [AdapterName] public string adapter = "";
        [Range(-8f, 8f)] public float adapterScale = 1f;
        [TextArea(3, 8)] public string systemPrompt = "";

        [Header("Generation")]
        [Min(1)] public int maxTokens = 128;
        [Range(0f, 2f)] public float temperature = 0.7f;
        [Range(0.01f, 1f)] public float topP = 0.95f;
        [Tooltip("Messages kept in the history (user and assistant turns); older ones are dropped.")]
        [Min(0)] public int maxHistoryMessages = 20;

        [Header("Events (main thread)")]
        [Tooltip("Each new piece of text as it streams in.")]
        public UnityEvent<string> ResponseUpdated = new UnityEvent<string>();
        [Tooltip("The whole reply once it is done.")]
        public UnityEvent<string> ResponseFinished = new UnityEvent<string>();
        [Tooltip("Why a request failed: the protocol error code and message.")]
        public UnityEvent<string> RequestFailed = new UnityEvent<string>();

        readonly List<ChatMessage> _history = new List<ChatMessage>();
        CancellationTokenSource _current;
        bool _destroyed;

        /// <summary>The conversation so far (user and assistant turns, oldest first).</summary>
        public IReadOnlyList<ChatMessage> History { get { return _history; } }

        /// <summary>True while a reply is being generated.</summary>
        public bool IsBusy { get { return _current != null; } }

        public LoraloomDaemon Daemon
        {
            get { return daemon != null ? daemon : LoraloomDaemon.Instance; }
            set { daemon = value; }
        }

        /// <summary>
        /// Says <paramref name="text"/> to the character and returns its reply. A reply still being
        /// generated is stopped first. The Task faults with <see cref="LoraloomException"/> (after
        /// <see cref="RequestFailed"/> fired) and ends cancelled if the NPC is destroyed or stopped.
        /// </summary>
        public async Task<string> Ask(string text)
        {
            if (_destroyed) throw new ObjectDisposedException(name);
            StopGeneration();
            var stop = new CancellationTokenSource();
            _current = stop;
            try
            {
                LoraloomDaemon owner = Daemon;
                if (owner == null) throw new LoraloomException(ErrorCodes.DaemonNotFound, "no LoraloomDaemon in the scene");
                LoraloomClient client = await owner.Ready;
                Generate request = BuildRequest(text);
                Completion done = await client.GenerateAsync(request, piece => MainThreadDispatcher.Post(() =>
                {
                    // Dropped if the NPC went away or a newer question replaced this one.
                    if (!_destroyed && _current == stop) ResponseUpdated.Invoke(piece);
                }), stop.Token);
                // Awaiting on the main thread resumes here on it (Unity's synchronization context).
                if (_destroyed || stop.IsCancellationRequested) throw new OperationCanceledException(stop.Token);
                Remember(new ChatMessage(ChatRole.User, text));
                Remember(new ChatMessage(ChatRole.Assistant, done.Text));
                // Pieces posted before this point run first: the queue keeps order.
                MainThreadDispatcher.Post(() =>
                {
                    if (!_destroyed) ResponseFinished.Invoke(done.Text);
                });
                return done.Text;
            }
            catch (LoraloomException e)
            {
                if (!_destroyed) RequestFailed.Invoke(e.Code + ": " + e.Message);
                throw;
            }
            finally
            {
                if (_current == stop) _current = null;
                stop.Dispose();
            }
        }

        /// <summary>For UI events and other void callers: Ask, with failures reported by <see cref="RequestFailed"/> and the log.</summary>
        public void AskAndForget(string text)
        {
            Ask(text).ContinueWith(t =>
            {
                if (t.IsFaulted) Debug.LogException(t.Exception.GetBaseException(), this);
            }, TaskContinuationOptions.OnlyOnFaulted);
        }

        /// <summary>Stops the reply being generated (the daemon stops working on it too).</summary>
        public void StopGeneration()
        {
            CancellationTokenSource current = _current;
            _current = null;
            if (current != null) current.Cancel();
        }

        /// <summary>Forgets the conversation (the system prompt stays).</summary>
        public void ClearHistory() { _history.Clear(); }

        Generate BuildRequest(string text)
        {
            var messages = new List<ChatMessage>();
            if (!string.IsNullOrEmpty(systemPrompt)) messages.Add(new ChatMessage(ChatRole.System, systemPrompt));
            messages.AddRange(_history);
            messages.Add(new ChatMessage(ChatRole.User, text));
            var request = new Generate
            {
                Messages = messages,
                MaxTokens = maxTokens,
                Temperature = temperature,
                TopP = topP,
            };
            if (!string.IsNullOrEmpty(adapter)) request.Adapters.Add(new AdapterRef(adapter, adapterScale));
            return request;
        }

        void Remember(ChatMessage message)
        {
            _history.Add(message);
            int excess = _history.Count - maxHistoryMessages;
            if (excess > 0) _history.RemoveRange(0, excess);
        }

        void OnDestroy()
        {
            _destroyed = true;
            StopGeneration();
        }
    }
}
