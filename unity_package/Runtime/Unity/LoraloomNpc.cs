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
    /// <see cref="ResponseUpdated"/> of a line, then its <see cref="ToolCalled"/> and
    /// <see cref="JsonReceived"/> if any, then its <see cref="ResponseFinished"/> (or
    /// <see cref="RequestFailed"/>), then the awaiting code resumes. After the component is
    /// destroyed nothing fires and the line in flight is cancelled on the daemon.</para>
    /// <para>Structured replies: <see cref="AskJsonAsync"/> (a JSON Schema, or a C# class with
    /// <see cref="AskJsonAsync{T}(string, CancellationToken)"/>), <see cref="AskChoiceAsync"/>,
    /// <see cref="AskRegexAsync"/>, <see cref="AskGrammarAsync"/>; and <see cref="Tools"/> with
    /// <see cref="AskToolCallsAsync"/>. A constrained line is recorded in the history like any
    /// other (its text is the JSON, the choice, the call).</para>
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

        [Header("Tools")]
        [Tooltip("With Tools set: auto (text or one call), required (one call), none (text), or a tool's name (a call of it).")]
        public string toolChoice = ToolChoice.Auto;

        [Header("Events (main thread)")]
        [Tooltip("Each new chunk of text as it streams in.")]
        public UnityEvent<string> ResponseUpdated = new UnityEvent<string>();
        [Tooltip("The whole reply once it is done (also after StopGeneration, with what was said).")]
        public UnityEvent<string> ResponseFinished = new UnityEvent<string>();
        [Tooltip("Why a line failed: the error code and the message.")]
        public UnityEvent<string, string> RequestFailed = new UnityEvent<string, string>();
        [Tooltip("A call of one of the NPC's Tools: its name and arguments (before ResponseFinished).")]
        public UnityEvent<string, Dictionary<string, object>> ToolCalled = new UnityEvent<string, Dictionary<string, object>>();
        [Tooltip("The parsed JSON of a line asked with a schema (before ResponseFinished).")]
        public UnityEvent<object> JsonReceived = new UnityEvent<object>();

        readonly Conversation _conversation = new Conversation();
        List<Tool> _tools = new List<Tool>();
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

        /// <summary>
        /// Functions the character may call (the game's actions), sent with every line that has no
        /// other constraint, with <see cref="toolChoice"/>. A call fires <see cref="ToolCalled"/>;
        /// <see cref="AskToolCallsAsync"/> returns them. Empty: none.
        /// </summary>
        public List<Tool> Tools
        {
            get { return _tools; }
            set { _tools = value ?? new List<Tool>(); }
        }

        public LoraloomDaemon Daemon
        {
            get { return daemon != null ? daemon : LoraloomDaemon.Instance; }
            set { daemon = value; }
        }

        /// <summary>
        /// Says <paramref name="text"/> to the character and returns its reply. It waits for the
        /// lines asked before it, and for the daemon (see <see cref="LoraloomDaemon.Ready"/>). Faults
        /// with <see cref="LoraloomException"/> (after <see cref="RequestFailed"/> fired); ends
        /// cancelled when <paramref name="cancellationToken"/> fires or the NPC is destroyed. With
        /// <see cref="Tools"/>, the reply may be a call: <see cref="ToolCalled"/> fires and the text
        /// is the call as the model wrote it.
        /// </summary>
        public Task<string> AskAsync(string text, CancellationToken cancellationToken = default(CancellationToken))
        {
            return AskLineAsync(text, null, done => done.Text, cancellationToken);
        }

        /// <summary>
        /// Says <paramref name="text"/> and returns the reply as JSON valid against
        /// <paramref name="schema"/> (a JSON Schema), parsed: null, bool, long, double, string,
        /// List&lt;object&gt; or Dictionary&lt;string, object&gt;. <see cref="JsonReceived"/> fires
        /// with it. Faults as <see cref="AskAsync"/> does, and with the code
        /// <see cref="ResultConstraint.Incomplete"/> when the reply ended before the JSON did
        /// (raise <see cref="maxTokens"/>, bound strings and numbers in the schema).
        /// </summary>
        public Task<object> AskJsonAsync(string text, IDictionary<string, object> schema,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (schema == null) throw new ArgumentNullException("schema");
            var copy = new Dictionary<string, object>(schema);
            return AskLineAsync(text, request => request.JsonSchema = copy, done => done.EnsureSatisfied().Json, cancellationToken);
        }

        /// <summary>
        /// The reply as a <typeparamref name="T"/>: the schema is <see cref="JsonSchema.For{T}"/>
        /// (public fields, bounded with <see cref="JsonFieldAttribute"/>), the JSON is read back
        /// with <see cref="JsonMapper"/>.
        /// </summary>
        public Task<T> AskJsonAsync<T>(string text, CancellationToken cancellationToken = default(CancellationToken))
        {
            Dictionary<string, object> schema = JsonSchema.For<T>();
            return AskLineAsync(text, request => request.JsonSchema = schema,
                done => JsonMapper.ToObject<T>(done.EnsureSatisfied().Json), cancellationToken);
        }

        /// <summary>The reply under <paramref name="schema"/>, read into a <typeparamref name="T"/>.</summary>
        public Task<T> AskJsonAsync<T>(string text, IDictionary<string, object> schema,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (schema == null) throw new ArgumentNullException("schema");
            var copy = new Dictionary<string, object>(schema);
            return AskLineAsync(text, request => request.JsonSchema = copy,
                done => JsonMapper.ToObject<T>(done.EnsureSatisfied().Json), cancellationToken);
        }

        /// <summary>
        /// The reply is exactly one of <paramref name="choices"/> (the game's actions, say); faults
        /// with <see cref="ResultConstraint.Incomplete"/> when it ended before one was complete.
        /// </summary>
        public Task<string> AskChoiceAsync(string text, IEnumerable<string> choices,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (choices == null) throw new ArgumentNullException("choices");
            var copy = new List<string>(choices);
            return AskLineAsync(text, request => request.Choices = copy, done => done.EnsureSatisfied().Text, cancellationToken);
        }

        /// <summary>The reply is the name of one of <typeparamref name="TEnum"/>'s values, returned as that value.</summary>
        public Task<TEnum> AskChoiceAsync<TEnum>(string text, CancellationToken cancellationToken = default(CancellationToken))
            where TEnum : struct
        {
            if (!typeof(TEnum).IsEnum) throw new ArgumentException(typeof(TEnum).Name + " is not an enum");
            var names = new List<string>(Enum.GetNames(typeof(TEnum)));
            return AskLineAsync(text, request => request.Choices = names,
                done => (TEnum)Enum.Parse(typeof(TEnum), done.EnsureSatisfied().Text), cancellationToken);
        }

        /// <summary>The reply matches <paramref name="pattern"/> (Rust regex syntax, the whole reply).</summary>
        public Task<string> AskRegexAsync(string text, string pattern,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (pattern == null) throw new ArgumentNullException("pattern");
            return AskLineAsync(text, request => request.Regex = pattern, done => done.EnsureSatisfied().Text, cancellationToken);
        }

        /// <summary>The reply matches <paramref name="grammar"/> (Lark syntax, llguidance's dialect).</summary>
        public Task<string> AskGrammarAsync(string text, string grammar,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (grammar == null) throw new ArgumentNullException("grammar");
            return AskLineAsync(text, request => request.Grammar = grammar, done => done.EnsureSatisfied().Text, cancellationToken);
        }

        /// <summary>
        /// Says <paramref name="text"/> with <see cref="Tools"/> and returns the calls the character
        /// made (empty when it answered in text, which <see cref="toolChoice"/> auto allows); each
        /// also fires <see cref="ToolCalled"/>. Faults with <see cref="ResultConstraint.Incomplete"/>
        /// when the reply ended before the call did.
        /// </summary>
        public Task<IList<ToolCall>> AskToolCallsAsync(string text, CancellationToken cancellationToken = default(CancellationToken))
        {
            if (_tools.Count == 0) throw new InvalidOperationException(name + " has no Tools");
            return AskLineAsync<IList<ToolCall>>(text, null, done => done.EnsureSatisfied().ToolCalls.AsReadOnly(), cancellationToken);
        }

        // One line: its place in the conversation's order now, its end read on the main thread.
        // constrain sets the line's constraint; without one the NPC's tools go out.
        Task<T> AskLineAsync<T>(string text, Action<Generate> constrain, Func<Completion, T> read,
            CancellationToken cancellationToken)
        {
            if (_destroyed) throw new ObjectDisposedException(name);
            var outcome = new TaskCompletionSource<T>();
            LoraloomDaemon owner = Daemon;
            Task<LoraloomClient> client = owner != null ? owner.Ready
                : FaultedClient(new LoraloomException(ErrorCodes.DaemonNotFound, "no LoraloomDaemon in the scene"));
            SyncConversation();
            Generate settings = BuildSettings();
            if (constrain != null) constrain(settings);
            else if (_tools.Count > 0)
            {
                settings.Tools = new List<Tool>(_tools);
                settings.ToolChoice = string.IsNullOrEmpty(toolChoice) ? ToolChoice.Auto : toolChoice;
            }
            bool json = settings.JsonSchema != null;
            var cancel = CancellationTokenSource.CreateLinkedTokenSource(_lifetime.Token, cancellationToken);
            Task<Completion> line = _conversation.AskAsync(client, text, settings, chunk => MainThreadDispatcher.Post(() =>
            {
                if (!_destroyed) ResponseUpdated.Invoke(chunk);
            }), cancel.Token);
            // Completed from the main-thread queue, behind the line's chunks: the caller resumes only
            // after the last ResponseUpdated and the ResponseFinished.
            line.ContinueWith(t =>
            {
                cancel.Dispose();
                MainThreadDispatcher.Post(() => Finish(t, read, json, outcome));
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

        void Finish<T>(Task<Completion> line, Func<Completion, T> read, bool json, TaskCompletionSource<T> outcome)
        {
            if (_destroyed || line.IsCanceled)
            {
                outcome.TrySetCanceled();
                return;
            }
            if (line.IsFaulted)
            {
                Fail(line.Exception.GetBaseException(), outcome);
                return;
            }
            Completion done = line.Result;
            T value;
            try
            {
                value = read(done);
            }
            catch (Exception e)
            {
                Fail(e, outcome);
                return;
            }
            // A listener that throws (the dispatcher logs it) must not leave the awaiting code hanging.
            try
            {
                foreach (ToolCall call in done.ToolCalls) ToolCalled.Invoke(call.Name, call.Arguments);
                if (json) JsonReceived.Invoke(done.Json);
                ResponseFinished.Invoke(done.Text);
            }
            finally
            {
                outcome.TrySetResult(value);
            }
        }

        void Fail<T>(Exception error, TaskCompletionSource<T> outcome)
        {
            var known = error as LoraloomException;
            try
            {
                RequestFailed.Invoke(known != null ? known.Code : ErrorCodes.Internal, known != null ? known.Reason : error.Message);
            }
            finally
            {
                outcome.TrySetException(error);
            }
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
