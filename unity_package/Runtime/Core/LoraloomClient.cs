using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Diagnostics;
using System.Threading;
using System.Threading.Tasks;

namespace Loraloom.Core
{
    /// <summary>
    /// One connection to the loraloom daemon, shared by every NPC and tool of a game. Requests run
    /// concurrently and each names its own adapters; the daemon batches them.
    /// </summary>
    /// <remarks>
    /// Every Task faults with <see cref="LoraloomException"/> carrying the protocol error code, or
    /// ends cancelled when its CancellationToken fires (the daemon is told to stop the request).
    /// Callbacks and events run on the client's network thread, in arrival order: marshal them to
    /// your main thread (Loraloom.Unity does that for you). If the connection drops (the daemon
    /// stopped, said <c>shutting_down</c>, or was killed), the client reconnects with backoff,
    /// re-reading the runtime file each time so a restarted daemon on a new port is found. Text and
    /// image requests the daemon had said nothing about yet go out again on the new connection;
    /// those that had started streaming fail with connection_closed or shutting_down (their output
    /// was already seen). Requests made while it is not connected wait for the connection, up to
    /// <see cref="LoraloomClientOptions.RequestConnectWait"/>.
    /// </remarks>
    public sealed partial class LoraloomClient : IDisposable
    {
        readonly LoraloomClientOptions _options;
        readonly object _gate = new object();
        readonly CancellationTokenSource _lifetime = new CancellationTokenSource();
        readonly Random _jitter = new Random();
        Connection _connection;
        TaskCompletionSource<Connection> _connected = NewConnectedSource();
        ConnectionState _state = ConnectionState.Connecting;
        List<AdapterInfo> _adapters = new List<AdapterInfo>();
        Welcome _welcome;
        bool _closed;
        bool _subscribed;
        bool _everConnected;
        int _nextId;

        LoraloomClient(LoraloomClientOptions options)
        {
            _options = options.Copy();
            _subscribed = options.SubscribeToAdapterEvents;
        }

        // ================================================================ connecting

        /// <summary>Connects through the runtime file, or the URL and token of <paramref name="options"/>.</summary>
        /// <exception cref="LoraloomException">daemon_not_found, unauthorized, unsupported_version, timeout.</exception>
        public static async Task<LoraloomClient> ConnectAsync(LoraloomClientOptions options = null,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            var client = new LoraloomClient(options ?? new LoraloomClientOptions());
            try
            {
                Connection connection = await client.OpenAsync(cancellationToken).ConfigureAwait(false);
                if (!client.Attach(connection)) throw Closed("the connection closed right after the handshake");
            }
            catch
            {
                client.Dispose();
                throw;
            }
            return client;
        }

        public static Task<LoraloomClient> ConnectAsync(string url, string token,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            return ConnectAsync(new LoraloomClientOptions { Url = url, Token = token }, cancellationToken);
        }

        /// <summary>
        /// A client that connects in the background and returns at once: for a game that starts
        /// before its daemon. It keeps trying with backoff (raising <see cref="ConnectionFailed"/>
        /// for each failed attempt) until it connects or is disposed; requests made meanwhile wait
        /// for the connection, up to <see cref="LoraloomClientOptions.RequestConnectWait"/>.
        /// </summary>
        public static LoraloomClient Open(LoraloomClientOptions options = null)
        {
            return Open(options, null);
        }

        /// <summary>
        /// As above; <paramref name="configure"/> runs before the first attempt, so that handlers
        /// attached there see every event, the first <see cref="Connected"/> included.
        /// </summary>
        public static LoraloomClient Open(LoraloomClientOptions options, Action<LoraloomClient> configure)
        {
            var client = new LoraloomClient(options ?? new LoraloomClientOptions());
            if (configure != null) configure(client);
            Task.Run(() => client.ConnectLoopAsync(false));
            return client;
        }

        /// <summary>
        /// Waits until the client is connected, at most <see cref="LoraloomClientOptions.RequestConnectWait"/>;
        /// returns the daemon's welcome. Faults with not_connected after that, connection_closed once disposed.
        /// </summary>
        public async Task<Welcome> WaitUntilConnectedAsync(CancellationToken cancellationToken = default(CancellationToken))
        {
            Connection connection = await WaitForConnectionAsync(cancellationToken).ConfigureAwait(false);
            return connection.Welcome;
        }

        // ================================================================ state and events

        /// <summary>The daemon's answer to the latest handshake: models, adapters, limits.</summary>
        public Welcome Welcome { get { lock (_gate) return _welcome; } }

        public ConnectionState State { get { lock (_gate) return _state; } }

        /// <summary>The adapters as last reported (handshake, list, or adapter events since).</summary>
        public IReadOnlyList<AdapterInfo> Adapters { get { lock (_gate) return _adapters.ToArray(); } }

        /// <summary>The last error of a failed reconnection attempt, for status displays.</summary>
        public LoraloomException LastConnectError { get; private set; }

        /// <summary>Raised with the new state whenever it changes.</summary>
        public event Action<ConnectionState> StateChanged;

        /// <summary>Raised with the daemon's welcome after every successful handshake, the first and each reconnection.</summary>
        public event Action<Welcome> Connected;

        /// <summary>Raised, after <see cref="Connected"/>, for every handshake that is not the client's first.</summary>
        public event Action<Welcome> Reconnected;

        /// <summary>
        /// Raised when an established connection closed: the WebSocket close code (1001 when the daemon
        /// is shutting down, 1006 when the connection just broke) and why.
        /// </summary>
        public event Action<int, string> Disconnected;

        /// <summary>Raised for every failed attempt to reconnect (or to connect, for a client made with <see cref="Open"/>).</summary>
        public event Action<LoraloomException> ConnectionFailed;

        /// <summary>An adapter was added, updated, removed or rejected on disk.</summary>
        public event Action<AdapterEvent> AdapterChanged;

        /// <summary>Every frame from the daemon, before it is routed: for tools and logs.</summary>
        public event Action<ProtocolMessage> MessageReceived;

        /// <summary>
        /// An event handler threw. Handlers run on the network thread and an exception there must
        /// not stop the client, so it is reported here (and to stderr when nobody listens).
        /// </summary>
        public event Action<Exception> HandlerFailed;

        // ================================================================ requests

        /// <summary>
        /// Generates text. <paramref name="onToken"/> receives each new piece as it streams (set
        /// <c>request.Stream = false</c> for none). Leave <c>request.Id</c> null to get a fresh id.
        /// </summary>
        public async Task<Completion> GenerateAsync(Generate request, Action<string> onToken = null,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (request == null) throw new ArgumentNullException("request");
            var pending = new TextRequest(request.Id ?? NextId(), onToken);
            return await RunAsync(request, pending, pending.Task, cancellationToken).ConfigureAwait(false);
        }

        /// <summary>A shortcut: one user turn (plus an optional system prompt) on one adapter.</summary>
        public Task<Completion> GenerateAsync(string text, string adapter = null, string systemPrompt = null,
            Action<string> onToken = null, CancellationToken cancellationToken = default(CancellationToken))
        {
            var request = new Generate { Messages = new List<ChatMessage>() };
            if (systemPrompt != null) request.Messages.Add(new ChatMessage(ChatRole.System, systemPrompt));
            request.Messages.Add(new ChatMessage(ChatRole.User, text));
            if (!string.IsNullOrEmpty(adapter)) request.Adapters.Add(AdapterRef.Parse(adapter));
            return GenerateAsync(request, onToken, cancellationToken);
        }

        /// <summary>Generates images; <paramref name="onProgress"/> receives each finished denoising step.</summary>
        public async Task<ImageResult> GenerateImageAsync(GenerateImage request, Action<ImageProgress> onProgress = null,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (request == null) throw new ArgumentNullException("request");
            var pending = new ImageRequest(request.Id ?? NextId(), onProgress);
            return await RunAsync(request, pending, pending.Task, cancellationToken).ConfigureAwait(false);
        }

        /// <summary>The daemon's current adapters (also refreshes <see cref="Adapters"/>).</summary>
        public async Task<IReadOnlyList<AdapterInfo>> ListAdaptersAsync(CancellationToken cancellationToken = default(CancellationToken))
        {
            var pending = new ReplyRequest<AdapterList>(NextId());
            AdapterList reply = await RunAsync(new ListAdapters(), pending, pending.Task, cancellationToken).ConfigureAwait(false);
            lock (_gate) _adapters = new List<AdapterInfo>(reply.Adapters);
            return reply.Adapters.AsReadOnly();
        }

        /// <summary>Subscribes to adapter events on this and every later connection; returns the current list.</summary>
        public async Task<IReadOnlyList<AdapterInfo>> SubscribeAsync(CancellationToken cancellationToken = default(CancellationToken))
        {
            lock (_gate) _subscribed = true;
            var pending = new ReplyRequest<AdapterList>(NextId());
            AdapterList reply = await RunAsync(new Subscribe(), pending, pending.Task, cancellationToken).ConfigureAwait(false);
            lock (_gate) _adapters = new List<AdapterInfo>(reply.Adapters);
            return reply.Adapters.AsReadOnly();
        }

        /// <summary>The round-trip time of one ping.</summary>
        public async Task<TimeSpan> PingAsync(CancellationToken cancellationToken = default(CancellationToken))
        {
            var pending = new ReplyRequest<Pong>(NextId());
            var clock = Stopwatch.StartNew();
            await RunAsync(new Ping(), pending, pending.Task, cancellationToken).ConfigureAwait(false);
            return clock.Elapsed;
        }

        // ================================================================ closing

        /// <summary>Closes the connection politely and stops reconnecting; idempotent.</summary>
        public async Task CloseAsync()
        {
            Connection connection = Shutdown();
            // The close handshake goes out before the read loop is cancelled, which would abort the socket.
            if (connection != null) await connection.Transport.CloseAsync(TimeSpan.FromSeconds(2)).ConfigureAwait(false);
            _lifetime.Cancel();
        }

        /// <summary>Drops the connection at once (no close handshake) and stops reconnecting; idempotent.</summary>
        public void Dispose()
        {
            Connection connection = Shutdown();
            _lifetime.Cancel();
            if (connection != null) connection.Transport.Dispose();
        }

        Connection Shutdown()
        {
            Connection connection;
            lock (_gate)
            {
                if (_closed) return null;
                _closed = true;
                connection = _connection;
                _connection = null;
                _connected.TrySetException(Closed("the client was closed"));
                _connected.Task.Forget();
            }
            SetState(ConnectionState.Closed);
            if (connection != null) connection.FailAll(Closed("the client was closed"));
            return connection;
        }

        // ================================================================ plumbing

        /// <summary>One WebSocket and the requests in flight on it; they die together.</summary>
        sealed class Connection
        {
            public readonly WebSocketTransport Transport;
            public readonly Welcome Welcome;
            public readonly ConcurrentDictionary<string, PendingRequest> Pending =
                new ConcurrentDictionary<string, PendingRequest>();
            public List<AdapterInfo> SubscribedAdapters;
            /// <summary>Set (under the client's lock) once its read loop ended; a dead connection is never attached.</summary>
            public bool Dead;
            /// <summary>Set when the daemon said it is shutting down: no longer the client's connection, not yet closed.</summary>
            public bool Detached;
            public Task Reader;

            public Connection(WebSocketTransport transport, Welcome welcome)
            {
                Transport = transport;
                Welcome = welcome;
            }

            public void FailAll(Exception error, bool tryAgain = false)
            {
                foreach (var pair in Pending)
                {
                    PendingRequest removed;
                    if (Pending.TryRemove(pair.Key, out removed) && !(tryAgain && removed.TryAgain())) removed.Fail(error);
                }
            }
        }

        string NextId() { return "cs-" + Interlocked.Increment(ref _nextId); }

        static TaskCompletionSource<Connection> NewConnectedSource()
        {
            return new TaskCompletionSource<Connection>(TaskCreationOptions.RunContinuationsAsynchronously);
        }

        static LoraloomException Closed(string why) { return new LoraloomException(ErrorCodes.ConnectionClosed, why); }

        async Task<T> RunAsync<T>(RequestMessage request, PendingRequest pending, Task<T> task, CancellationToken cancellationToken)
        {
            cancellationToken.ThrowIfCancellationRequested();
            RequestMessage frame = request.Id == pending.Id ? request : request.WithId(pending.Id);
            while (true)
            {
                Connection connection = await WaitForConnectionAsync(cancellationToken).ConfigureAwait(false);
                Task again = pending.NextAttempt();
                if (!connection.Pending.TryAdd(pending.Id, pending))
                    throw new LoraloomException(ErrorCodes.DuplicateId, "a request with id '" + pending.Id + "' is already in flight", pending.Id);
                try
                {
                    await connection.Transport.SendAsync(frame, _lifetime.Token).ConfigureAwait(false);
                }
                catch (Exception e)
                {
                    PendingRequest ignored;
                    connection.Pending.TryRemove(pending.Id, out ignored);
                    if (_lifetime.IsCancellationRequested) throw Closed("the client was closed");
                    var closed = e as LoraloomException;
                    // The connection is closing under us: nothing went out, so wait for the next one.
                    if (closed != null && closed.Code == ErrorCodes.ConnectionClosed && pending.Retryable && _options.AutoReconnect)
                    {
                        Detach(connection);
                        continue;
                    }
                    throw;
                }
                // Registered only once the request is on the wire, so a cancel frame never overtakes it;
                // a token cancelled meanwhile runs the callback right here.
                using (cancellationToken.Register(() => CancelRequest(connection, pending, cancellationToken)))
                {
                    Task first = await Task.WhenAny(task, again).ConfigureAwait(false);
                    if (first == task) return await task.ConfigureAwait(false);
                }
                // The connection went away before the daemon said anything about the request: it goes
                // out again on the next connection (see PendingRequest.TryAgain).
            }
        }

        // The Task ends cancelled at once; the request stays registered until the daemon's final
        // result arrives, so its late chunks are recognised and dropped instead of misrouted.
        void CancelRequest(Connection connection, PendingRequest pending, CancellationToken token)
        {
            if (pending.IsDone || !pending.Abandon()) return;
            pending.Cancelled(token);
            SendCancel(connection, pending.Id);
        }

        void SendCancel(Connection connection, string id)
        {
            // Cancelling is best effort: if the connection is gone the daemon has dropped the request anyway.
            connection.Transport.SendAsync(new Cancel { Id = id }, CancellationToken.None).Forget();
        }

        void SetState(ConnectionState state)
        {
            lock (_gate)
            {
                if (_state == state) return;
                if (_state == ConnectionState.Closed) return;
                _state = state;
            }
            Raise(StateChanged, state);
        }

        void Raise<T1, T2>(Action<T1, T2> handler, T1 first, T2 second)
        {
            if (handler == null) return;
            try
            {
                handler(first, second);
            }
            catch (Exception e)
            {
                ReportHandlerFailure(e);
            }
        }

        void Raise<T>(Action<T> handler, T value)
        {
            if (handler == null) return;
            try
            {
                handler(value);
            }
            catch (Exception e)
            {
                ReportHandlerFailure(e);
            }
        }

        void ReportHandlerFailure(Exception e)
        {
            Action<Exception> report = HandlerFailed;
            if (report != null)
            {
                try { report(e); }
                catch (Exception) { Console.Error.WriteLine("loraloom: an event handler failed: " + e); }
            }
            else
            {
                Console.Error.WriteLine("loraloom: an event handler failed: " + e);
            }
        }
    }
}
