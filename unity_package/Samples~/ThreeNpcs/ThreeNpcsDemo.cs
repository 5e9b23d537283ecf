using System.Collections.Generic;
using System.Text;
using Loraloom.Unity;
using UnityEngine;

namespace Loraloom.Samples
{
    /// <summary>
    /// Three characters on three different adapters answering the same question at the same time.
    /// Add this component to an empty GameObject in any scene and press Play: it creates the daemon
    /// component and the NPCs itself, and draws its own UI, so the sample needs no scene assets.
    /// </summary>
    public sealed class ThreeNpcsDemo : MonoBehaviour
    {
        [System.Serializable]
        public sealed class Character
        {
            public string displayName = "NPC";
            [AdapterName] public string adapter = "";
            [TextArea] public string systemPrompt = "";
        }

        public List<Character> characters = new List<Character>
        {
            new Character { displayName = "Quartermaster", adapter = "pirate", systemPrompt = "You are a pirate quartermaster. Answer in one or two sentences." },
            new Character { displayName = "Archivist", adapter = "elf", systemPrompt = "You are an elven archivist. Answer in one or two sentences." },
            new Character { displayName = "Blacksmith", adapter = "blacksmith", systemPrompt = "You are a grumpy blacksmith. Answer in one or two sentences." },
        };

        string _question = "Hello, who goes there?";
        readonly List<LoraloomNpc> _npcs = new List<LoraloomNpc>();
        readonly List<StringBuilder> _replies = new List<StringBuilder>();
        readonly List<string> _errors = new List<string>();

        void Awake()
        {
            if (LoraloomDaemon.Instance == null) new GameObject("Loraloom Daemon").AddComponent<LoraloomDaemon>();
            for (int i = 0; i < characters.Count; i++)
            {
                var npc = new GameObject(characters[i].displayName).AddComponent<LoraloomNpc>();
                npc.transform.SetParent(transform, false);
                npc.adapter = characters[i].adapter;
                npc.systemPrompt = characters[i].systemPrompt;
                var reply = new StringBuilder();
                int index = i;
                _replies.Add(reply);
                _errors.Add("");
                // Events arrive on the main thread, so they can touch UI and fields directly.
                npc.ResponseUpdated.AddListener(piece => reply.Append(piece));
                npc.ResponseFinished.AddListener(text => Debug.Log(characters[index].displayName + ": " + text));
                npc.RequestFailed.AddListener((code, message) => _errors[index] = code + ": " + message);
                _npcs.Add(npc);
            }
        }

        void AskEveryone()
        {
            for (int i = 0; i < _npcs.Count; i++)
            {
                _replies[i].Length = 0;
                _errors[i] = "";
                // No await: all three requests are in flight together and the daemon batches them.
                _npcs[i].AskAndForget(_question);
            }
        }

        void OnGUI()
        {
            GUILayout.BeginArea(new Rect(10, 10, Screen.width - 20, Screen.height - 20));
            LoraloomDaemon daemon = LoraloomDaemon.Instance;
            GUILayout.Label("Daemon: " + (daemon != null ? daemon.Status : "none"));
            GUILayout.BeginHorizontal();
            _question = GUILayout.TextField(_question, GUILayout.MinWidth(300));
            if (GUILayout.Button("Ask all three", GUILayout.Width(120))) AskEveryone();
            GUILayout.EndHorizontal();
            for (int i = 0; i < _npcs.Count; i++)
            {
                GUILayout.Space(8);
                GUILayout.Label(characters[i].displayName + " (" + (string.IsNullOrEmpty(characters[i].adapter) ? "base model" : characters[i].adapter) + ")"
                    + (_npcs[i].IsBusy ? "  ..." : ""));
                GUILayout.TextArea(_errors[i].Length > 0 ? "error " + _errors[i] : _replies[i].ToString(), GUILayout.MinHeight(60));
            }
            GUILayout.EndArea();
        }
    }
}
