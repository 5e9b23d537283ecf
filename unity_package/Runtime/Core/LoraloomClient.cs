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

        async Task<Connection> WaitForConnectionAsync(CancellationToken cancellationToken)
        {
            Task<Connection> connected;
            lock (_gate)
            {
                if (_closed) throw Closed("the client was closed");
                connected = _connected.Task;
            }
            if (connected.IsCompleted) return await connected.ConfigureAwait(false);
            using (var wait = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken))
            {
                Task delay = Task.Delay(_options.RequestConnectWait, wait.Token);
                Task first = await Task.WhenAny(connected, delay).ConfigureAwait(false);
                wait.Cancel();
                if (first == connected) return await connected.ConfigureAwait(false);
            }
            cancellationToken.ThrowIfCancellationRequested();
            lock (_gate)
            {
                if (_closed) throw Closed("the client was closed");
            }
            LoraloomException last = LastConnectError;
            throw new LoraloomException(ErrorCodes.NotConnected, "no connection to the daemon within "
                + _options.RequestConnectWait.TotalSeconds + " s" + (last != null ? " (last attempt: " + last.Message + ")" : ""));
        }

        /// <summary>Resolves the endpoint, does the WebSocket and hello/welcome handshakes, subscribes if asked.</summary>
        async Task<Connection> OpenAsync(CancellationToken cancellationToken)
        {
            string url = _options.Url;
            string token = _options.Token;
            if (url == null || token == null)
            {
                // Read afresh on every attempt: a restarted daemon has a new port and maybe a new token.
                RuntimeInfo info = RuntimeFile.Read(_options.RuntimeFile);
                url = url ?? info.Url;
                token = token ?? info.Token;
            }
            Uri uri;
            if (!Uri.TryCreate(url, UriKind.Absolute, out uri) || (uri.Scheme != "ws" && uri.Scheme != "wss"))
                throw new LoraloomException(ErrorCodes.DaemonNotFound, "'" + url + "' is not a ws:// URL");

            WebSocketTransport transport = await WebSocketTransport.ConnectAsync(uri, _options.ConnectTimeout, cancellationToken).ConfigureAwait(false);
            Connection connection;
            try
            {
                var hello = new Hello { Protocol = Protocol.Version, Token = token, Client = _options.ClientName };
                await transport.SendAsync(hello, cancellationToken).ConfigureAwait(false);
                ProtocolMessage first = await ReceiveHandshakeAsync(transport, uri, cancellationToken).ConfigureAwait(false);
                var error = first as Error;
                if (error != null) throw new LoraloomException(error.Code, error.Message);
                var welcome = first as Welcome;
                if (welcome == null) throw new LoraloomException(ErrorCodes.BadMessage, "expected 'welcome', got '" + first.Type + "'");
                if (welcome.Protocol != Protocol.Version)
                    throw new LoraloomException(ErrorCodes.UnsupportedVersion, "the daemon speaks protocol " + welcome.Protocol + ", this client " + Protocol.Version);
                connection = new Connection(transport, welcome);
            }
            catch
            {
                transport.Dispose();
                throw;
            }

            connection.Reader = Task.Run(() => ReadLoopAsync(connection));

            bool subscribe;
            lock (_gate) subscribe = _subscribed;
            if (subscribe)
            {
                var pending = new ReplyRequest<AdapterList>(NextId());
                connection.Pending[pending.Id] = pending;
                try
                {
                    await transport.SendAsync(new Subscribe { Id = pending.Id }, cancellationToken).ConfigureAwait(false);
                    Task finished = await Task.WhenAny(pending.Task, Task.Delay(_options.ConnectTimeout, cancellationToken)).ConfigureAwait(false);
                    if (finished != pending.Task)
                    {
                        cancellationToken.ThrowIfCancellationRequested();
                        throw new LoraloomException(ErrorCodes.Timeout, "no answer to 'subscribe' within " + _options.ConnectTimeout.TotalSeconds + " s");
                    }
                    connection.SubscribedAdapters = (await pending.Task.ConfigureAwait(false)).Adapters;
                }
                catch
                {
                    transport.Dispose();
                    throw;
                }
            }
            // Before the connection is attached, so no request on it runs outside the game's budget.
            await ApplyKeptBudgetAsync(connection, cancellationToken).ConfigureAwait(false);
            return connection;
        }

        async Task<ProtocolMessage> ReceiveHandshakeAsync(WebSocketTransport transport, Uri uri, CancellationToken cancellationToken)
        {
            using (var limit = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken))
            {
                limit.CancelAfter(_options.ConnectTimeout);
                int length;
                try
                {
                    length = await transport.ReceiveAsync(limit.Token).ConfigureAwait(false);
                }
                catch (Exception e)
                {
                    if (cancellationToken.IsCancellationRequested) throw new OperationCanceledException(cancellationToken);
                    if (limit.IsCancellationRequested)
                        throw new LoraloomException(ErrorCodes.Timeout, "no 'welcome' from " + uri + " within " + _options.ConnectTimeout.TotalSeconds + " s");
                    if (e is LoraloomException) throw;
                    throw Closed("the daemon closed the connection during the handshake: " + WebSocketTransport.Describe(e));
                }
                if (length < 0)
                    throw Closed("the daemon closed the connection during the handshake (" + transport.CloseStatus + " " + transport.CloseDescription + ")");
                return Protocol.Decode(transport.Buffer, 0, length);
            }
        }

        bool Attach(Connection connection)
        {
            bool again;
            lock (_gate)
            {
                if (_closed || connection.Dead)
                {
                    connection.Transport.Dispose();
                    return false;
                }
                _connection = connection;
                _welcome = connection.Welcome;
                _adapters = new List<AdapterInfo>(connection.SubscribedAdapters ?? connection.Welcome.Adapters);
                _connected.TrySetResult(connection);
                LastConnectError = null;
                again = _everConnected;
                _everConnected = true;
            }
            SetState(ConnectionState.Connected);
            Raise(Connected, connection.Welcome);
            if (again) Raise(Reconnected, connection.Welcome);
            return true;
        }

        async Task ReadLoopAsync(Connection connection)
        {
            string why = null;
            int code = 1006; // abnormal closure: no close frame
            try
            {
                while (true)
                {
                    int length = await connection.Transport.ReceiveAsync(_lifetime.Token).ConfigureAwait(false);
                    if (length < 0)
                    {
                        if (connection.Transport.CloseStatus.HasValue) code = (int)connection.Transport.CloseStatus.Value;
                        why = "the daemon closed the connection (" + connection.Transport.CloseStatus + " " + connection.Transport.CloseDescription + ")";
                        break;
                    }
                    ProtocolMessage message;
                    try
                    {
                        message = Protocol.Decode(connection.Transport.Buffer, 0, length);
                    }
                    catch (LoraloomException)
                    {
                        continue; // a newer daemon's message this client does not know
                    }
                    Dispatch(connection, message);
                }
            }
            catch (Exception e)
            {
                why = "the connection to the daemon was lost: " + WebSocketTransport.Describe(e);
            }
            ConnectionLost(connection, code, why);
        }

        void Dispatch(Connection connection, ProtocolMessage message)
        {
            Raise(MessageReceived, message);
            var adapterEvent = message as AdapterEvent;
            if (adapterEvent != null)
            {
                Remember(adapterEvent);
                Raise(AdapterChanged, adapterEvent);
                return;
            }
            var error = message as Error;
            // The daemon is stopping: it ends what is in flight, then closes. Requests made from now
            // on wait for the next connection instead of going out on this one.
            if (error != null && error.Code == ErrorCodes.ShuttingDown) Detach(connection);
            string id = message.RequestId;
            PendingRequest pending;
            if (id == null || !connection.Pending.TryGetValue(id, out pending)) return;
            if (error != null && error.Code == ErrorCodes.ShuttingDown && _options.AutoReconnect && !pending.Answered)
            {
                // Stopped by the daemon's shutdown before it produced anything: the next daemon answers it.
                PendingRequest ignored;
                connection.Pending.TryRemove(id, out ignored);
                if (pending.TryAgain()) return;
            }
            pending.MarkAnswered();
            if (pending.Handle(message))
            {
                connection.Pending.TryRemove(id, out pending);
            }
            else if (pending.CallbackError != null && pending.Abandon())
            {
                SendCancel(connection, id);
            }
        }

        void Remember(AdapterEvent adapterEvent)
        {
            if (adapterEvent.Adapter == null) return;
            lock (_gate)
            {
                int at = _adapters.FindIndex(a => a.Name == adapterEvent.Adapter.Name && a.Kind == adapterEvent.Adapter.Kind);
                bool gone = adapterEvent.Event == AdapterEventKind.Removed;
                var updated = new List<AdapterInfo>(_adapters);
                if (at >= 0 && gone) updated.RemoveAt(at);
                else if (at >= 0) updated[at] = adapterEvent.Adapter;
                else if (!gone) updated.Add(adapterEvent.Adapter);
                _adapters = updated;
            }
        }

        void Detach(Connection connection)
        {
            lock (_gate)
            {
                if (_connection != connection || _closed || !_options.AutoReconnect) return;
                _connection = null;
                connection.Detached = true;
                _connected = NewConnectedSource();
            }
        }

        void ConnectionLost(Connection connection, int code, string why)
        {
            why = why ?? "the connection to the daemon closed";
            bool attached;
            bool reconnect = false;
            lock (_gate)
            {
                // Detached before its requests fail, so what they trigger waits for the next connection.
                connection.Dead = true;
                attached = _connection == connection || connection.Detached;
                if (_connection == connection) _connection = null;
                if (attached && !_closed)
                {
                    reconnect = _options.AutoReconnect;
                    if (reconnect && !connection.Detached) _connected = NewConnectedSource();
                    if (!reconnect)
                    {
                        _closed = true;
                        _connected.TrySetException(Closed(why));
                        _connected.Task.Forget();
                    }
                }
                else
                {
                    attached = false; // never attached, replaced, or the client was closed
                }
            }
            connection.Transport.Dispose();
            // Requests the daemon said nothing about yet go out again on the next connection.
            connection.FailAll(Closed(why), reconnect);
            if (!attached) return;
            Raise(Disconnected, code, why);
            if (!reconnect)
            {
                SetState(ConnectionState.Closed);
                return;
            }
            SetState(ConnectionState.Reconnecting);
            Task.Run(() => ConnectLoopAsync(true));
        }

        async Task ConnectLoopAsync(bool waitFirst)
        {
            TimeSpan delay = _options.ReconnectMinDelay;
            while (!_lifetime.IsCancellationRequested)
            {
                LoraloomException failure;
                try
                {
                    if (waitFirst) await Task.Delay(Jittered(delay), _lifetime.Token).ConfigureAwait(false);
                    waitFirst = true;
                    Connection connection = await OpenAsync(_lifetime.Token).ConfigureAwait(false);
                    if (Attach(connection)) return;
                    continue;
                }
                catch (OperationCanceledException)
                {
                    if (_lifetime.IsCancellationRequested) return;
                    continue;
                }
                catch (LoraloomException e)
                {
                    failure = e;
                }
                catch (Exception e)
                {
                    failure = new LoraloomException(ErrorCodes.DaemonNotFound, WebSocketTransport.Describe(e), null, e);
                }
                LastConnectError = failure;
                Raise(ConnectionFailed, failure);
                long doubled = Math.Min(delay.Ticks * 2, _options.ReconnectMaxDelay.Ticks);
                delay = TimeSpan.FromTicks(Math.Max(doubled, _options.ReconnectMinDelay.Ticks));
            }
        }

        // Up to a quarter less than the delay, so many clients of one restarted daemon do not arrive together.
        TimeSpan Jittered(TimeSpan delay)
        {
            double factor;
            lock (_jitter) factor = 0.75 + 0.25 * _jitter.NextDouble();
            return TimeSpan.FromTicks((long)(delay.Ticks * factor));
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
