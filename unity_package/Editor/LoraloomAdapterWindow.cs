using System.Linq;
using Loraloom.Core;
using Loraloom.Unity;
using UnityEditor;
using UnityEngine;

namespace Loraloom.Editor
{
    /// <summary>
    /// Window > Loraloom > Adapters: the daemon's models and adapters and, in play mode, the live
    /// stream of adapter and connection events, so a designer sees an edited adapter swap in.
    /// </summary>
    sealed class LoraloomAdapterWindow : EditorWindow
    {
        Vector2 _adapterScroll;
        Vector2 _eventScroll;

        [MenuItem("Window/Loraloom/Adapters")]
        static void Open()
        {
            GetWindow<LoraloomAdapterWindow>("Loraloom Adapters").Show();
        }

        void OnEnable()
        {
            if (!Application.isPlaying) AdapterCatalog.Refresh();
        }

        // Events arrive between editor repaints: redraw a few times a second while playing.
        void OnInspectorUpdate()
        {
            if (Application.isPlaying || AdapterCatalog.IsRefreshing) Repaint();
        }

        void OnGUI()
        {
            LoraloomDaemon daemon = Application.isPlaying ? LoraloomDaemon.Instance : null;
            LoraloomClient client = daemon != null ? daemon.Client : null;

            EditorGUILayout.Space();
            using (new EditorGUILayout.HorizontalScope())
            {
                if (Application.isPlaying)
                {
                    string status = daemon == null ? "no LoraloomDaemon in the scene" : daemon.Status;
                    EditorGUILayout.LabelField("Daemon", status);
                }
                else
                {
                    EditorGUILayout.LabelField("Daemon", AdapterCatalog.LastError.Length > 0 ? AdapterCatalog.LastError : "edit mode: adapters from the running daemon");
                    using (new EditorGUI.DisabledScope(AdapterCatalog.IsRefreshing))
                    {
                        if (GUILayout.Button("Refresh", GUILayout.Width(70))) AdapterCatalog.Refresh();
                    }
                }
            }

            if (client != null && client.Welcome != null)
            {
                Welcome welcome = client.Welcome;
                EditorGUILayout.LabelField("Server", "loraloom " + welcome.Server + " (" + client.State + ")");
                EditorGUILayout.LabelField("Text model", Describe(welcome.TextModel));
                EditorGUILayout.LabelField("Image model", Describe(welcome.ImageModel));
            }

            EditorGUILayout.Space();
            EditorGUILayout.LabelField("Adapters", EditorStyles.boldLabel);
            using (new EditorGUILayout.HorizontalScope(EditorStyles.toolbar))
            {
                GUILayout.Label("name", GUILayout.Width(160));
                GUILayout.Label("kind", GUILayout.Width(50));
                GUILayout.Label("status", GUILayout.Width(60));
                GUILayout.Label("version", GUILayout.Width(55));
                GUILayout.Label("rank", GUILayout.Width(40));
                GUILayout.Label("notes");
            }
            _adapterScroll = EditorGUILayout.BeginScrollView(_adapterScroll, GUILayout.MinHeight(120));
            foreach (AdapterInfo adapter in AdapterCatalog.Adapters.OrderBy(a => a.Kind).ThenBy(a => a.Name))
            {
                using (new EditorGUILayout.HorizontalScope())
                {
                    GUILayout.Label(adapter.Name, GUILayout.Width(160));
                    GUILayout.Label(adapter.Kind, GUILayout.Width(50));
                    GUILayout.Label(adapter.Status, GUILayout.Width(60));
                    GUILayout.Label(adapter.Version.HasValue ? "v" + adapter.Version.Value : "-", GUILayout.Width(55));
                    GUILayout.Label(adapter.Rank.HasValue ? adapter.Rank.Value.ToString() : "-", GUILayout.Width(40));
                    GUILayout.Label(adapter.Error ?? string.Join(", ", adapter.Targets.ToArray()), EditorStyles.wordWrappedMiniLabel);
                }
            }
            EditorGUILayout.EndScrollView();

            EditorGUILayout.Space();
            EditorGUILayout.LabelField("Live events", EditorStyles.boldLabel);
            if (daemon == null)
            {
                EditorGUILayout.HelpBox("Enter play mode with a LoraloomDaemon in the scene to see adapter events as folders change.", MessageType.Info);
                return;
            }
            _eventScroll = EditorGUILayout.BeginScrollView(_eventScroll);
            foreach (string line in daemon.RecentEvents.Reverse()) EditorGUILayout.LabelField(line, EditorStyles.miniLabel);
            EditorGUILayout.EndScrollView();
        }

        static string Describe(ModelInfo model)
        {
            if (model == null) return "none";
            return model.Name + " on " + model.Device + " (" + model.Dtype + ")" + (model.Placeholder ? " - placeholder, draws noise" : "");
        }
    }
}
