using System;
using System.Collections.Generic;
using System.Linq;
using System.Threading.Tasks;
using Loraloom.Core;
using Loraloom.Unity;

namespace Loraloom.Editor
{
    /// <summary>
    /// The adapter names the inspector offers. In play mode they come from the live connection; in
    /// edit mode from a short-lived connection through the runtime file, refreshed on request, so
    /// the editor never starts a daemon by itself.
    /// </summary>
    static class AdapterCatalog
    {
        static readonly object Gate = new object();
        static List<AdapterInfo> _editModeAdapters = new List<AdapterInfo>();
        static Task _refreshing;
        static string _lastError = "";

        public static string LastError { get { return _lastError; } }

        public static bool IsRefreshing { get { return _refreshing != null && !_refreshing.IsCompleted; } }

        public static IReadOnlyList<AdapterInfo> Adapters
        {
            get
            {
                LoraloomDaemon daemon = LoraloomDaemon.Instance;
                if (UnityEngine.Application.isPlaying && daemon != null && daemon.Client != null) return daemon.Client.Adapters;
                lock (Gate) return _editModeAdapters.ToArray();
            }
        }

        public static string[] Names(string kind)
        {
            return Adapters.Where(a => a.Kind == kind && a.Status != AdapterStatus.Removed)
                .Select(a => a.Name).OrderBy(n => n, StringComparer.Ordinal).ToArray();
        }

        /// <summary>Asks a running daemon for its adapters (edit mode); no-op while a refresh runs.</summary>
        public static void Refresh()
        {
            if (IsRefreshing) return;
            _refreshing = Task.Run(async () =>
            {
                try
                {
                    var options = new LoraloomClientOptions
                    {
                        ClientName = "unity-editor",
                        AutoReconnect = false,
                        SubscribeToAdapterEvents = false,
                        ConnectTimeout = TimeSpan.FromSeconds(3),
                    };
                    using (LoraloomClient client = await LoraloomClient.ConnectAsync(options))
                    {
                        IReadOnlyList<AdapterInfo> list = await client.ListAdaptersAsync();
                        lock (Gate) _editModeAdapters = list.ToList();
                    }
                    _lastError = "";
                }
                catch (Exception e)
                {
                    _lastError = e.GetBaseException().Message;
                }
            });
        }
    }
}
