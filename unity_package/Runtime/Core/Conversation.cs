using System;
using System.Collections.Generic;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace Loraloom.Core
{
    /// <summary>
    /// A persona (system prompt) and the recent turns of one chat, kept to what the daemon's context
    /// holds. The Unity NPC component (LoraloomNpc) is one of these plus main-thread events.
    /// </summary>
    /// <remarks>
    /// <para>Trimming: every line is sent with the persona, the whole history and
    /// <c>trim_history</c> on. When that does not fit the context with room for the reply, the
    /// daemon leaves out the oldest whole turns (counted in its own tokens; never system messages,
    /// never the new line), cutting down to 3/4 of its budget so the following lines keep the same
    /// prefix, and with it the keys and values it has cached. The result says how many messages it
    /// left out (<see cref="Completion.DroppedMessages"/>, counted after the leading system
    /// messages) and the conversation forgets the same ones, so its history never outgrows the
    /// context by more than a line.</para>
    /// <para>Order: lines asked while another is being answered wait for it and go out one at a
    /// time, in the order they were asked, each with the exchanges before it.</para>
    /// <para>What is recorded: a finished line adds the user's text and the reply. A line stopped
    /// with <see cref="StopGeneration"/> ends normally with the text generated until then (finish
    /// reason <c>cancelled</c>) and is recorded unless that text is empty. A constrained line cut
    /// short (result constraint <c>incomplete</c>) is not recorded. A failed line, one whose
    /// CancellationToken fired, and a line answered after <see cref="History"/> was replaced (a save
    /// loaded meanwhile) change nothing.</para>
    /// <para>Saving: <see cref="ToJson"/> gives plain JSON,
    /// <c>{"system_prompt": "...", "history": [{"role": "user", "content": "..."}, ...]}</c>, the
    /// same form the Godot addon and the Python client write.</para>
    /// </remarks>
    public sealed class Conversation
    {
        readonly object _gate = new object();
        List<ChatMessage> _history = new List<ChatMessage>();
        int _generation;
        int _lines;
        Task _tail = Task.FromResult(true);
        CancellationTokenSource _stop;
        string _systemPrompt = "";
        bool _keepHistory = true;
        int _maxHistoryTurns;

        public Conversation(string systemPrompt = null)
        {
            _systemPrompt = systemPrompt ?? "";
        }

        /// <summary>Sent first with every line; empty sends none. Never trimmed.</summary>
        public string SystemPrompt
        {
            get { lock (_gate) return _systemPrompt; }
            set { lock (_gate) _systemPrompt = value ?? ""; }
        }

        /// <summary>False: every line goes out with the persona only, and nothing is recorded.</summary>
        public bool KeepHistory
        {
            get { lock (_gate) return _keepHistory; }
            set { lock (_gate) _keepHistory = value; }
        }

        /// <summary>
        /// The most turns kept (a turn is a user message and the replies after it); 0 keeps what the
        /// daemon's context holds. Older turns go first, whole.
        /// </summary>
        public int MaxHistoryTurns
        {
            get { lock (_gate) return _maxHistoryTurns; }
            set { lock (_gate) _maxHistoryTurns = Math.Max(0, value); }
        }

        /// <summary>
        /// The turns so far, oldest first (a copy). Setting it replaces them (roles: system, user,
        /// assistant); an answer still on its way is then not recorded.
        /// </summary>
        public IList<ChatMessage> History
        {
            get
            {
                lock (_gate) return Copy(_history);
            }
            set
            {
                List<ChatMessage> checkedCopy = Checked(value);
                lock (_gate)
                {
                    _history = checkedCopy;
                    _generation++;
                }
            }
        }

        /// <summary>The end of the last line answered (its token counts, dropped messages, ...).</summary>
        public Completion LastCompletion
        {
            get { lock (_gate) return _lastCompletion; }
        }
        Completion _lastCompletion;

        /// <summary>True while a line is being answered or waits for its turn.</summary>
        public bool IsBusy { get { lock (_gate) return _lines > 0; } }

        /// <summary>The messages a line with <paramref name="text"/> would be sent with now.</summary>
        public List<ChatMessage> MessagesFor(string text)
        {
            lock (_gate) return BuildMessages(text);
        }

        /// <summary>Forgets the turns; the persona stays.</summary>
        public void Clear() { History = new List<ChatMessage>(); }

        /// <summary>
        /// Ends the line being answered now, with what was generated so far (the lines waiting behind
        /// it still go out). The daemon stops working on it.
        /// </summary>
        public void StopGeneration()
        {
            CancellationTokenSource stop;
            lock (_gate) stop = _stop;
            if (stop == null) return;
            try { stop.Cancel(); }
            catch (ObjectDisposedException) { }
        }

        /// <summary>
        /// Says <paramref name="text"/> and returns the end of the reply. <paramref name="settings"/>
        /// gives the adapters and sampling (its messages, prompt and id are ignored);
        /// <paramref name="onChunk"/> gets each new piece of text on the client's network thread.
        /// Faults with <see cref="LoraloomException"/>; ends cancelled when
        /// <paramref name="cancellationToken"/> fires (also while it waits for its turn).
        /// </summary>
        public Task<Completion> AskAsync(LoraloomClient client, string text, Generate settings = null,
            Action<string> onChunk = null, CancellationToken cancellationToken = default(CancellationToken))
        {
            if (client == null) throw new ArgumentNullException("client");
            return AskAsync(Task.FromResult(client), text, settings, onChunk, cancellationToken);
        }

        /// <summary>
        /// As above, with a client that may not exist yet (a component's connection that is still
        /// being set up): the line takes its place in the order at once.
        /// </summary>
        public async Task<Completion> AskAsync(Task<LoraloomClient> client, string text, Generate settings = null,
            Action<string> onChunk = null, CancellationToken cancellationToken = default(CancellationToken))
        {
            if (client == null) throw new ArgumentNullException("client");
            if (text == null) throw new ArgumentNullException("text");
            var mine = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            Task previous;
            lock (_gate)
            {
                previous = _tail;
                _tail = mine.Task;
                _lines++;
            }
            try
            {
                await WaitForTurnAsync(previous, cancellationToken).ConfigureAwait(false);
                LoraloomClient connection = await client.ConfigureAwait(false);
                return await AnswerAsync(connection, text, settings, onChunk, cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                lock (_gate) _lines--;
                // The next line goes once this one and every line before it ended.
                if (previous.IsCompleted) mine.TrySetResult(true);
                else previous.ContinueWith(t => mine.TrySetResult(true), TaskContinuationOptions.ExecuteSynchronously).Forget();
            }
        }

        /// <summary>The persona and the history as plain JSON, for a save game.</summary>
        public string ToJson()
        {
            string persona;
            List<ChatMessage> history;
            lock (_gate)
            {
                persona = _systemPrompt;
                history = Copy(_history);
            }
            var sb = new StringBuilder("{\"system_prompt\": ").Append(Json.Quote(persona)).Append(", \"history\": [");
            for (int i = 0; i < history.Count; i++)
            {
                if (i > 0) sb.Append(", ");
                sb.Append("{\"role\": ").Append(Json.Quote(history[i].Role))
                  .Append(", \"content\": ").Append(Json.Quote(history[i].Content)).Append('}');
            }
            return sb.Append("]}").ToString();
        }

        /// <summary>
        /// Restores the persona and the history <see cref="ToJson"/> wrote (or the Godot addon or the
        /// Python client). Throws FormatException, changing nothing, when it is not such a save.
        /// </summary>
        public void LoadJson(string json)
        {
            object parsed;
            try
            {
                parsed = Json.Parse(json ?? "");
            }
            catch (FormatException e)
            {
                throw new FormatException("not a saved conversation: " + e.Message, e);
            }
            var map = parsed as Dictionary<string, object>;
            object persona = null;
            object turns = null;
            if (map == null || !map.TryGetValue("history", out turns) || !(turns is List<object>)
                || (map.TryGetValue("system_prompt", out persona) && persona != null && !(persona is string)))
                throw new FormatException("not a saved conversation: expected {\"system_prompt\": string, \"history\": [...]}");
            var history = new List<ChatMessage>();
            foreach (object item in (List<object>)turns)
            {
                var turn = item as Dictionary<string, object>;
                object role = null;
                object content = null;
                if (turn == null || !turn.TryGetValue("role", out role) || !turn.TryGetValue("content", out content)
                    || !(role is string) || !(content is string) || !IsRole((string)role))
                    throw new FormatException("not a saved conversation: each turn is {\"role\": system|user|assistant, \"content\": string}");
                history.Add(new ChatMessage((string)role, (string)content));
            }
            lock (_gate)
            {
                _systemPrompt = (string)persona ?? "";
                _history = history;
                _generation++;
            }
        }

        /// <summary>A conversation from what <see cref="ToJson"/> wrote.</summary>
        public static Conversation FromJson(string json)
        {
            var conversation = new Conversation();
            conversation.LoadJson(json);
            return conversation;
        }

        // ---------------------------------------------------------------- plumbing

        static async Task WaitForTurnAsync(Task previous, CancellationToken cancellationToken)
        {
            if (previous.IsCompleted) return;
            var cancelled = new TaskCompletionSource<bool>();
            using (cancellationToken.Register(() => cancelled.TrySetResult(true)))
            {
                await Task.WhenAny(previous, cancelled.Task).ConfigureAwait(false);
            }
            cancellationToken.ThrowIfCancellationRequested();
        }

        async Task<Completion> AnswerAsync(LoraloomClient client, string text, Generate settings, Action<string> onChunk,
            CancellationToken cancellationToken)
        {
            int generation;
            Generate request = settings != null ? (Generate)settings.WithId(null) : new Generate();
            var stop = new CancellationTokenSource();
            lock (_gate)
            {
                generation = _generation;
                request.Messages = BuildMessages(text);
                _stop = stop;
            }
            request.Prompt = null;
            request.TrimHistory = true;
            var partial = new StringBuilder();
            Completion done;
            try
            {
                using (var either = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, stop.Token))
                {
                    done = await client.GenerateAsync(request, chunk =>
                    {
                        lock (partial) partial.Append(chunk);
                        if (onChunk != null) onChunk(chunk);
                    }, either.Token).ConfigureAwait(false);
                }
            }
            catch (OperationCanceledException)
            {
                // Stopped by StopGeneration: a normal end with what was said so far. The caller's own
                // token stays a cancellation.
                if (cancellationToken.IsCancellationRequested || !stop.IsCancellationRequested) throw;
                lock (partial) done = new Completion { Id = request.Id, Text = partial.ToString(), FinishReason = FinishReason.Cancelled };
            }
            finally
            {
                lock (_gate)
                {
                    if (_stop == stop) _stop = null;
                }
                stop.Dispose();
            }
            lock (_gate)
            {
                _lastCompletion = done;
                if (generation == _generation && _keepHistory) Record(text, done);
            }
            return done;
        }

        // Under the lock.
        List<ChatMessage> BuildMessages(string text)
        {
            var messages = new List<ChatMessage>();
            if (_systemPrompt.Length > 0) messages.Add(new ChatMessage(ChatRole.System, _systemPrompt));
            if (_keepHistory) messages.AddRange(Copy(_history));
            messages.Add(new ChatMessage(ChatRole.User, text));
            return messages;
        }

        // Under the lock.
        void Record(string text, Completion done)
        {
            int lead = LeadingSystemMessages(_history);
            _history.RemoveRange(lead, Math.Min(Math.Max(0, done.DroppedMessages), _history.Count - lead));
            if (done.FinishReason == FinishReason.Cancelled && string.IsNullOrEmpty(done.Text)) return;
            // Constrained output cut short (JSON without its end, half a call): the line failed, and
            // a broken example in the history would only teach the model to break it again.
            if (done.Constraint == ResultConstraint.Incomplete) return;
            _history.Add(new ChatMessage(ChatRole.User, text));
            _history.Add(new ChatMessage(ChatRole.Assistant, done.Text ?? ""));
            if (_maxHistoryTurns <= 0) return;
            var starts = new List<int>();
            for (int i = lead; i < _history.Count; i++)
                if (_history[i].Role == ChatRole.User) starts.Add(i);
            if (starts.Count > _maxHistoryTurns) _history.RemoveRange(lead, starts[starts.Count - _maxHistoryTurns] - lead);
        }

        static int LeadingSystemMessages(List<ChatMessage> history)
        {
            int lead = 0;
            while (lead < history.Count && history[lead].Role == ChatRole.System) lead++;
            return lead;
        }

        static bool IsRole(string role)
        {
            return role == ChatRole.System || role == ChatRole.User || role == ChatRole.Assistant;
        }

        static List<ChatMessage> Copy(IEnumerable<ChatMessage> messages)
        {
            var copy = new List<ChatMessage>();
            foreach (ChatMessage m in messages) copy.Add(new ChatMessage(m.Role, m.Content));
            return copy;
        }

        static List<ChatMessage> Checked(IEnumerable<ChatMessage> messages)
        {
            if (messages == null) return new List<ChatMessage>();
            var copy = new List<ChatMessage>();
            foreach (ChatMessage m in messages)
            {
                if (m == null || !IsRole(m.Role) || m.Content == null)
                    throw new ArgumentException("each history message needs a role (system, user or assistant) and a content");
                copy.Add(new ChatMessage(m.Role, m.Content));
            }
            return copy;
        }
    }
}
