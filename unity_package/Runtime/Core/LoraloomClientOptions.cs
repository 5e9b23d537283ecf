using System;

namespace Loraloom.Core
{
    /// <summary>How a <see cref="LoraloomClient"/> finds the daemon and behaves when it goes away.</summary>
    public sealed class LoraloomClientOptions
    {
        // ------------------------------------------------------------ where
        /// <summary>ws://host:port/ of the daemon; null reads it from the runtime file.</summary>
        public string Url;
        /// <summary>The daemon's token; null reads it from the runtime file.</summary>
        public string Token;
        /// <summary>The runtime file to read; null is the default location (see <see cref="RuntimeFile"/>).</summary>
        public string RuntimeFile;
        /// <summary>A name for the daemon's logs (hello.client).</summary>
        public string ClientName = "unity";

        // ------------------------------------------------------------ timeouts
        /// <summary>Limit for the WebSocket handshake plus hello/welcome.</summary>
        public TimeSpan ConnectTimeout = TimeSpan.FromSeconds(10);
        /// <summary>
        /// How long a request made while not connected (the daemon is still starting, or restarting)
        /// waits for the connection before it fails with not_connected.
        /// </summary>
        public TimeSpan RequestConnectWait = TimeSpan.FromSeconds(30);

        // ------------------------------------------------------------ reconnection
        /// <summary>Reconnect after the connection drops (the daemon restarted, say).</summary>
        public bool AutoReconnect = true;
        /// <summary>The first delay before reconnecting; it doubles after each failed attempt.</summary>
        public TimeSpan ReconnectMinDelay = TimeSpan.FromMilliseconds(250);
        public TimeSpan ReconnectMaxDelay = TimeSpan.FromSeconds(5);

        // ------------------------------------------------------------ events
        /// <summary>Subscribe to adapter events on every connection, so <see cref="LoraloomClient.AdapterChanged"/> fires.</summary>
        public bool SubscribeToAdapterEvents = true;

        internal LoraloomClientOptions Copy() { return (LoraloomClientOptions)MemberwiseClone(); }
    }

    /// <summary>Where a client stands with its daemon.</summary>
    public enum ConnectionState
    {
        Connecting,
        Connected,
        /// <summary>The connection dropped; the client is trying again with backoff. Requests wait.</summary>
        Reconnecting,
        /// <summary>Closed by the caller (or dropped with reconnection off); every request fails.</summary>
        Closed,
    }
}
