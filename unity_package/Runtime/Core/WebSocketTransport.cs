using System;
using System.Net.WebSockets;
using System.Threading;
using System.Threading.Tasks;

namespace Loraloom.Core
{
    /// <summary>
    /// Binary frames over one ClientWebSocket: whole messages in, whole messages out. Sends are
    /// serialised (ClientWebSocket allows one send at a time); there is one reader, the client's loop.
    /// </summary>
    sealed class WebSocketTransport : IDisposable
    {
        // A frame larger than this is a broken peer, not a big image: refuse it instead of running out of memory.
        const int MaxMessageBytes = 512 * 1024 * 1024;

        readonly ClientWebSocket _socket;
        readonly SemaphoreSlim _sendLock = new SemaphoreSlim(1, 1);
        readonly MsgPackWriter _writer = new MsgPackWriter(1024);
        byte[] _receiveBuffer = new byte[64 * 1024];
        int _disposed;

        WebSocketTransport(ClientWebSocket socket) { _socket = socket; }

        public static async Task<WebSocketTransport> ConnectAsync(Uri url, TimeSpan timeout, CancellationToken cancellationToken)
        {
            var socket = new ClientWebSocket();
            // The daemon keeps the connection alive itself; a client-side ping would only add frames.
            socket.Options.KeepAliveInterval = TimeSpan.Zero;
            using (var limit = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken))
            {
                limit.CancelAfter(timeout);
                try
                {
                    await socket.ConnectAsync(url, limit.Token).ConfigureAwait(false);
                }
                catch (Exception e)
                {
                    socket.Dispose();
                    if (cancellationToken.IsCancellationRequested) throw new OperationCanceledException(cancellationToken);
                    if (limit.IsCancellationRequested)
                        throw new LoraloomException(ErrorCodes.Timeout, "no WebSocket handshake from " + url + " within " + timeout.TotalSeconds + " s");
                    throw new LoraloomException(ErrorCodes.DaemonNotFound, "cannot reach the daemon at " + url + ": " + Describe(e), null, e);
                }
            }
            return new WebSocketTransport(socket);
        }

        public bool IsOpen { get { return _socket.State == WebSocketState.Open; } }

        public async Task SendAsync(ProtocolMessage message, CancellationToken cancellationToken)
        {
            await _sendLock.WaitAsync(cancellationToken).ConfigureAwait(false);
            try
            {
                _writer.Clear();
                message.WriteTo(_writer);
                await _socket.SendAsync(_writer.AsSegment(), WebSocketMessageType.Binary, true, cancellationToken).ConfigureAwait(false);
            }
            catch (Exception e)
            {
                if (e is OperationCanceledException || e is LoraloomException) throw;
                throw new LoraloomException(ErrorCodes.ConnectionClosed, "cannot send to the daemon: " + Describe(e), message.RequestId, e);
            }
            finally
            {
                _sendLock.Release();
            }
        }

        /// <summary>
        /// The next binary message as (buffer, length), valid until the next call; length -1 when the
        /// daemon closed the connection. Text frames are not part of the protocol and are skipped.
        /// </summary>
        public async Task<int> ReceiveAsync(CancellationToken cancellationToken)
        {
            while (true)
            {
                int length = 0;
                WebSocketReceiveResult result;
                do
                {
                    if (length == _receiveBuffer.Length)
                    {
                        if (length >= MaxMessageBytes)
                            throw new LoraloomException(ErrorCodes.FrameTooLarge, "the daemon sent a frame over " + MaxMessageBytes + " bytes");
                        Array.Resize(ref _receiveBuffer, Math.Min(MaxMessageBytes, length * 2));
                    }
                    var segment = new ArraySegment<byte>(_receiveBuffer, length, _receiveBuffer.Length - length);
                    result = await _socket.ReceiveAsync(segment, cancellationToken).ConfigureAwait(false);
                    if (result.MessageType == WebSocketMessageType.Close) return -1;
                    length += result.Count;
                } while (!result.EndOfMessage);
                if (result.MessageType == WebSocketMessageType.Binary) return length;
            }
        }

        public byte[] Buffer { get { return _receiveBuffer; } }

        public WebSocketCloseStatus? CloseStatus { get { return _socket.CloseStatus; } }

        public string CloseDescription { get { return _socket.CloseStatusDescription; } }

        /// <summary>A polite close with a time limit; the socket is aborted if the daemon does not answer.</summary>
        public async Task CloseAsync(TimeSpan timeout)
        {
            if (_socket.State == WebSocketState.Open || _socket.State == WebSocketState.CloseReceived)
            {
                using (var limit = new CancellationTokenSource(timeout))
                {
                    try
                    {
                        await _socket.CloseOutputAsync(WebSocketCloseStatus.NormalClosure, "bye", limit.Token).ConfigureAwait(false);
                    }
                    catch (Exception)
                    {
                        // Closing is best effort: the socket is aborted below either way.
                    }
                }
            }
            Dispose();
        }

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
            try { _socket.Abort(); }
            catch (Exception) { }
            _socket.Dispose();
        }

        internal static string Describe(Exception e)
        {
            var inner = e;
            string text = e.Message;
            while (inner.InnerException != null)
            {
                inner = inner.InnerException;
                text += " (" + inner.Message + ")";
            }
            return text;
        }
    }
}
