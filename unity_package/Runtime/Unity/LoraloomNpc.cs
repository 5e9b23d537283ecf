using System;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;
using Loraloom.Core;
using UnityEngine;
using UnityEngine.Events;

namespace Loraloom.Unity
{
    /// <summary>When a line is scheduled against other requests (the wire's <c>generate.priority</c>).</summary>
    public enum LinePriority
    {
        /// <summary>A line the player waits for: admitted and prefilled first.</summary>
        Player,
        Normal,
        /// <summary>Ambient chatter: last, and may be paused to make room.</summary>
        Background,
    }

    /// <summary>
    /// One conversation: a character with its own adapter, persona (system prompt) and history.
    /// Many NPCs share one <see cref="LoraloomDaemon"/>; their lines run at the same time and the
    /// daemon batches them across adapters.
    /// </summary>
    /// <remarks>
    /// <para>The history is trimmed by the daemon to its real token budget: each line goes out with
    /// the persona and the whole history, the daemon leaves out the oldest whole turns when they do
    /// not fit (down to 3/4 of the budget, so the next lines keep the same prefix), and the NPC
    /// forgets the same ones. See <see cref="Conversation"/>.</para>
    /// <para>Lines asked while one is being answered wait and go out in order, each with the
    /// exchanges before it. Events fire on the main thread, in order: every
    /// <see cref="ResponseUpdated"/> of a line, then its <see cref="ResponseFinished"/> (or
    /// <see cref="RequestFailed"/>), then the awaiting code resumes. After the component is
    /// destroyed nothing fires and the line in flight is cancelled on the daemon.</para>
    /// </remarks>
    [AddComponentMenu("Loraloom/Loraloom NPC")]
    public sealed class LoraloomNpc : MonoBehaviour
    {
        [Tooltip("Leave empty to use LoraloomDaemon.Instance.")]
        [SerializeField] LoraloomDaemon daemon;

        [Header("Voice")]
        [Tooltip("The adapter this character speaks with; empty is the base model.")]
        [AdapterName] public string adapter = "";
        [Tooltip("How strongly the adapter applies: 1 as trained, 0 none, negative pushes away from it.")]
        [Range(-8f, 8f)] public float adapterScale = 1f;
        [Tooltip("The persona, sent first with every line and never trimmed; empty sends none.")]
        [TextArea(3, 8)] public string systemPrompt = "";

        [Header("Conversation")]
        [Tooltip("Remember the exchanges and send them with each new line.")]
        public bool keepHistory = true;
        [Tooltip("The most turns kept (a question and its answer); 0 keeps what the daemon's context holds.")]
        [Min(0)] public int maxHistoryTurns = 0;

        [Header("Sampling")]
        [Tooltip("The most tokens one answer may have.")]
        [Min(1)] public int maxTokens = 128;
        [Tooltip("Randomness: 0 always picks the likeliest token.")]
        [Range(0f, 5f)] public float temperature = 0.7f;
        [Tooltip("Sample only among the k likeliest tokens; 0 turns it off.")]
        [Min(0)] public int topK = 0;
        [Tooltip("Sample only among the likeliest tokens whose probabilities add up to p; 1 turns it off.")]
        [Range(0.01f, 1f)] public float topP = 1f;
        [Tooltip("Above 1 makes repeating earlier tokens less likely.")]
        [Range(0.05f, 5f)] public float repetitionPenalty = 1f;
        [Tooltip("Seed for repeatable answers; -1 picks a new one each time.")]
        public long seed = -1;
        [Tooltip("Texts that end an answer when generated (not included in it).")]
        public List<string> stopSequences = new List<string>();
        [Tooltip("Player lines are scheduled first, background chatter last.")]
        public LinePriority priority = LinePriority.Normal;

        [Header("Events (main thread)")]
        [Tooltip("Each new chunk of text as it streams in.")]
        public UnityEvent<string> ResponseUpdated = new UnityEvent<string>();
        [Tooltip("The whole reply once it is done (also after StopGeneration, with what was said).")]
        public UnityEvent<string> ResponseFinished = new UnityEvent<string>();
        [Tooltip("Why a line failed: the error code and the message.")]
        public UnityEvent<string, string> RequestFailed = new UnityEvent<string, string>();

        readonly Conversation _conversation = new Conversation();
        readonly CancellationTokenSource _lifetime = new CancellationTokenSource();
        bool _destroyed;

        /// <summary>The conversation itself (history, last completion); shared with any code that drives it.</summary>
        public Conversation Conversation { get { return _conversation; } }

        /// <summary>
        /// The turns so far, oldest first (a copy). Set it to restore a conversation; a line still
        /// being answered is then not recorded.
        /// </summary>
        public IList<ChatMessage> History
        {
            get { return _conversation.History; }
            set { _conversation.History = value; }
        }

        /// <summary>True while a line is being answered or waits for its turn.</summary>
        public bool IsBusy { get { return _conversation.IsBusy; } }

        public LoraloomDaemon Daemon
        {
            get { return daemon != null ? daemon : LoraloomDaemon.Instance; }
            set { daemon = value; }
        }

        /// <summary>
        /// Says <paramref name="text"/> to the character and returns its reply. It waits for the
        /// lines asked before it, and for the daemon (see <see cref="LoraloomDaemon.Ready"/>). Faults
        /// with <see cref="LoraloomException"/> (after <see cref="RequestFailed"/> fired); ends
        /// cancelled when <paramref name="cancellationToken"/> fires or the NPC is destroyed.
        /// </summary>
        public Task<string> AskAsync(string text, CancellationToken cancellationToken = default(CancellationToken))
        {
            if (_destroyed) throw new ObjectDisposedException(name);
            var outcome = new TaskCompletionSource<string>();
            LoraloomDaemon owner = Daemon;
            Task<LoraloomClient> client = owner != null ? owner.Ready
                : FaultedClient(new LoraloomException(ErrorCodes.DaemonNotFound, "no LoraloomDaemon in the scene"));
            SyncConversation();
            var cancel = CancellationTokenSource.CreateLinkedTokenSource(_lifetime.Token, cancellationToken);
            // The line takes its place in the conversation's order now, on the caller's frame.
            Task<Completion> line = _conversation.AskAsync(client, text, BuildSettings(), chunk => MainThreadDispatcher.Post(() =>
            {
                if (!_destroyed) ResponseUpdated.Invoke(chunk);
            }), cancel.Token);
            // Completed from the main-thread queue, behind the line's chunks: the caller resumes only
            // after the last ResponseUpdated and the ResponseFinished.
            line.ContinueWith(t =>
            {
                cancel.Dispose();
                MainThreadDispatcher.Post(() => Finish(t, outcome));
            }, TaskContinuationOptions.ExecuteSynchronously);
            return outcome.Task;
        }

        /// <summary>For UI events and other void callers: AskAsync, with failures reported by <see cref="RequestFailed"/> and the log.</summary>
        public void AskAndForget(string text)
        {
            AskAsync(text).ContinueWith(t =>
            {
                if (t.IsFaulted) Debug.LogException(t.Exception.GetBaseException(), this);
            }, TaskContinuationOptions.OnlyOnFaulted);
        }

        /// <summary>Deprecated: use <see cref="AskAsync"/>.</summary>
        [Obsolete("Use AskAsync (or AskAndForget for UI events).")]
        public Task<string> Ask(string text) { return AskAsync(text); }

        /// <summary>
        /// Ends the line being answered now: it finishes with what was said so far (the daemon stops
        /// working on it). Lines asked after it still go out.
        /// </summary>
        public void StopGeneration() { _conversation.StopGeneration(); }

        /// <summary>Forgets the conversation (the persona stays).</summary>
        public void ClearHistory() { _conversation.Clear(); }

        /// <summary>The persona and the history as plain JSON for a save game (see <see cref="Conversation.ToJson"/>).</summary>
        public string SaveConversation()
        {
            SyncConversation();
            return _conversation.ToJson();
        }

        /// <summary>
        /// Restores what <see cref="SaveConversation"/> wrote, persona included (FormatException,
        /// nothing changed, when it is not such a save). To keep the inspector's persona, set
        /// <see cref="History"/> instead.
        /// </summary>
        public void LoadConversation(string json)
        {
            _conversation.LoadJson(json);
            systemPrompt = _conversation.SystemPrompt;
        }

        void SyncConversation()
        {
            _conversation.SystemPrompt = systemPrompt;
            _conversation.KeepHistory = keepHistory;
            _conversation.MaxHistoryTurns = maxHistoryTurns;
        }

        Generate BuildSettings()
        {
            var request = new Generate
            {
                MaxTokens = maxTokens,
                Temperature = temperature,
                TopK = topK,
                TopP = topP,
                RepetitionPenalty = repetitionPenalty,
                Seed = seed >= 0 ? seed : (long?)null,
                Stop = new List<string>(stopSequences ?? new List<string>()),
                Priority = PriorityName(priority),
            };
            if (!string.IsNullOrEmpty(adapter)) request.Adapters.Add(new AdapterRef(adapter, adapterScale));
            return request;
        }

        void Finish(Task<Completion> line, TaskCompletionSource<string> outcome)
        {
            if (_destroyed || line.IsCanceled)
            {
                outcome.TrySetCanceled();
                return;
            }
            if (line.IsFaulted)
            {
                Exception error = line.Exception.GetBaseException();
                var known = error as LoraloomException;
                RequestFailed.Invoke(known != null ? known.Code : ErrorCodes.Internal, known != null ? known.Reason : error.Message);
                outcome.TrySetException(error);
                return;
            }
            ResponseFinished.Invoke(line.Result.Text);
            outcome.TrySetResult(line.Result.Text);
        }

        static string PriorityName(LinePriority priority)
        {
            switch (priority)
            {
                case LinePriority.Player: return GeneratePriority.Player;
                case LinePriority.Background: return GeneratePriority.Background;
                default: return GeneratePriority.Normal;
            }
        }

        static Task<LoraloomClient> FaultedClient(Exception error)
        {
            var failed = new TaskCompletionSource<LoraloomClient>();
            failed.SetException(error);
            return failed.Task;
        }

        void OnDestroy()
        {
            _destroyed = true;
            _lifetime.Cancel();
        }
    }
}
