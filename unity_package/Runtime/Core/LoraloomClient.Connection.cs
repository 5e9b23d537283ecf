using System;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;

namespace Loraloom.Core
{
    // The connection's life cycle: waiting for one, opening it (runtime file, handshake), the read
    // loop and what each daemon message does, losing it and reconnecting with backoff.
    public sealed partial class LoraloomClient
    {
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
    }
}
