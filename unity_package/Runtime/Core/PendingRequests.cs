using System;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;

namespace Loraloom.Core
{
    /// <summary>The end of a text request: what <see cref="LoraloomClient.GenerateAsync"/> returns.</summary>
    public sealed class Completion
    {
        public string Id;
        /// <summary>The whole text (also the concatenation of the streamed pieces).</summary>
        public string Text;
        /// <summary>One of <see cref="Loraloom.Core.FinishReason"/>.</summary>
        public string FinishReason;
        public int PromptTokens;
        public int CompletionTokens;
        /// <summary>Which version of each adapter served the request.</summary>
        public Dictionary<string, int> AdapterVersions;
        public Timings Timings;
        /// <summary>Prompt tokens whose keys and values the daemon reused from an earlier request.</summary>
        public int CachedTokens;
        /// <summary>With <c>Generate.TrimHistory</c>: messages the daemon left out after the system messages, oldest first.</summary>
        public int DroppedMessages;
        /// <summary>How many chunk events arrived (0 when not streaming).</summary>
        public int Chunks;
        /// <summary>
        /// With a constraint or tools: <see cref="ResultConstraint.Satisfied"/>, or
        /// <see cref="ResultConstraint.Incomplete"/> when the output ended first (max_tokens, the
        /// context, a stop string, a stop); null without one.
        /// </summary>
        public string Constraint;
        /// <summary>
        /// With <c>Generate.JsonSchema</c>: the output parsed, as the tree msgpack gives (null,
        /// bool, long, double, string, List&lt;object&gt;, Dictionary&lt;string, object&gt;); null
        /// when incomplete.
        /// </summary>
        public object Json;
        /// <summary>With <c>Generate.Tools</c>: the call the model made (empty when it answered in text).</summary>
        public List<ToolCall> ToolCalls = new List<ToolCall>();

        /// <summary>True when the output is whole under its constraint or tools.</summary>
        public bool Satisfied { get { return Constraint == ResultConstraint.Satisfied; } }

        /// <summary>
        /// Throws <see cref="LoraloomException"/> with the code <see cref="ResultConstraint.Incomplete"/>
        /// unless the constrained output is whole; returns this completion.
        /// </summary>
        public Completion EnsureSatisfied()
        {
            if (Satisfied) return this;
            if (Constraint == null)
                throw new LoraloomException(ResultConstraint.Incomplete, "the result carries no constraint state (the request had no constraint)", Id);
            throw new LoraloomException(ResultConstraint.Incomplete, "the output ended (finish reason " + FinishReason + ", "
                + CompletionTokens + " tokens) before its constraint was satisfied", Id);
        }

        public override string ToString() { return "[" + FinishReason + ", " + CompletionTokens + " tokens] " + Text; }
    }

    /// <summary>The client side of one request in flight on one connection.</summary>
    abstract class PendingRequest
    {
        public readonly string Id;
        int _abandoned;
        int _answered;
        TaskCompletionSource<bool> _again;

        protected PendingRequest(string id) { Id = id; }

        /// <summary>True once the daemon sent anything about the request.</summary>
        public bool Answered { get { return Volatile.Read(ref _answered) != 0; } }

        public void MarkAnswered() { Interlocked.Exchange(ref _answered, 1); }

        /// <summary>Whether a request the daemon said nothing about may be sent again (text and images: no side effects).</summary>
        public virtual bool Retryable { get { return false; } }

        /// <summary>A Task that completes when the request must go out again; one per attempt.</summary>
        public Task NextAttempt()
        {
            var again = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            Volatile.Write(ref _again, again);
            return again.Task;
        }

        /// <summary>
        /// Sends the request again on the next connection instead of failing it, when that is safe: it
        /// may be retried, nobody gave up on it, and the daemon said nothing about it yet.
        /// </summary>
        public bool TryAgain()
        {
            if (!Retryable || Answered || Abandoned || IsDone) return false;
            TaskCompletionSource<bool> again = Volatile.Read(ref _again);
            return again != null && again.TrySetResult(true);
        }

        /// <summary>True once the caller stopped listening (cancelled, or its callback threw): later events are dropped.</summary>
        public bool Abandoned { get { return Volatile.Read(ref _abandoned) != 0; } }

        /// <summary>Marks the request abandoned; true for the first caller only.</summary>
        public bool Abandon() { return Interlocked.Exchange(ref _abandoned, 1) == 0; }

        /// <summary>Handles one event; true when it ends the request.</summary>
        public bool Handle(ProtocolMessage message)
        {
            var error = message as Error;
            if (error != null)
            {
                Fail(new LoraloomException(error.Code, error.Message, Id));
                return true;
            }
            return HandleEvent(message);
        }

        protected abstract bool HandleEvent(ProtocolMessage message);

        /// <summary>Set when the caller's callback threw: that exception faults the task and the request is cancelled.</summary>
        public Exception CallbackError;

        public abstract void Fail(Exception error);

        public abstract void Cancelled(CancellationToken token);

        public abstract bool IsDone { get; }

        protected static LoraloomException Unexpected(ProtocolMessage message, string what)
        {
            return new LoraloomException(ErrorCodes.BadMessage, "unexpected '" + message.Type + "' event for " + what);
        }
    }

    abstract class PendingRequest<T> : PendingRequest
    {
        protected readonly TaskCompletionSource<T> Completion =
            new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);

        protected PendingRequest(string id) : base(id) { }

        public Task<T> Task { get { return Completion.Task; } }

        public override bool IsDone { get { return Completion.Task.IsCompleted; } }

        public override void Fail(Exception error) { Completion.TrySetException(error); }

        public override void Cancelled(CancellationToken token) { Completion.TrySetCanceled(token); }
    }

    /// <summary>generate: chunks to the callback, then the result.</summary>
    sealed class TextRequest : PendingRequest<Completion>
    {
        readonly Action<string> _onToken;
        int _chunks;

        public TextRequest(string id, Action<string> onToken) : base(id) { _onToken = onToken; }

        public override bool Retryable { get { return true; } }

        protected override bool HandleEvent(ProtocolMessage message)
        {
            var chunk = message as Chunk;
            if (chunk != null)
            {
                _chunks++;
                if (_onToken != null && !Abandoned)
                {
                    try
                    {
                        _onToken(chunk.Text);
                    }
                    catch (Exception e)
                    {
                        CallbackError = e;
                        Fail(e);
                    }
                }
                return false;
            }
            var result = message as Result;
            if (result != null)
            {
                Completion.TrySetResult(new Completion
                {
                    Id = result.Id,
                    Text = result.Text,
                    FinishReason = result.FinishReason,
                    PromptTokens = result.PromptTokens,
                    CompletionTokens = result.CompletionTokens,
                    AdapterVersions = result.AdapterVersions,
                    Timings = result.Timings,
                    CachedTokens = result.CachedTokens,
                    DroppedMessages = result.DroppedMessages,
                    Chunks = _chunks,
                    Constraint = result.Constraint,
                    Json = result.Json,
                    ToolCalls = result.ToolCalls ?? new List<ToolCall>(),
                });
                return true;
            }
            Fail(Unexpected(message, "a text request"));
            return true;
        }
    }

    /// <summary>generate_image: progress to the callback, then the images.</summary>
    sealed class ImageRequest : PendingRequest<ImageResult>
    {
        readonly Action<ImageProgress> _onProgress;

        public ImageRequest(string id, Action<ImageProgress> onProgress) : base(id) { _onProgress = onProgress; }

        public override bool Retryable { get { return true; } }

        protected override bool HandleEvent(ProtocolMessage message)
        {
            var progress = message as ImageProgress;
            if (progress != null)
            {
                if (_onProgress != null && !Abandoned)
                {
                    try
                    {
                        _onProgress(progress);
                    }
                    catch (Exception e)
                    {
                        CallbackError = e;
                        Fail(e);
                    }
                }
                return false;
            }
            var result = message as ImageResult;
            if (result != null)
            {
                Completion.TrySetResult(result);
                return true;
            }
            Fail(Unexpected(message, "an image request"));
            return true;
        }
    }

    /// <summary>A request answered by exactly one event of type <typeparamref name="T"/> (ping, list_adapters, subscribe).</summary>
    sealed class ReplyRequest<T> : PendingRequest<T> where T : ProtocolMessage
    {
        public ReplyRequest(string id) : base(id) { }

        protected override bool HandleEvent(ProtocolMessage message)
        {
            var reply = message as T;
            if (reply != null) Completion.TrySetResult(reply);
            else Fail(Unexpected(message, "a '" + typeof(T).Name + "' request"));
            return true;
        }
    }
}
