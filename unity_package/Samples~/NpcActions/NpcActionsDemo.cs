using System;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;
using Loraloom.Core;
using Loraloom.Unity;
using UnityEngine;

namespace Loraloom.Samples
{
    /// <summary>The moves the guard's game code knows how to play; the model picks one by name.</summary>
    public enum GuardAction { attack, block, flee, parley }

    public enum QuestKind { fetch, escort, slay }

    /// <summary>A quest as the game stores it; <see cref="JsonFieldAttribute"/> bounds what the model writes.</summary>
    [Serializable]
    public sealed class Quest
    {
        [JsonField(MinLength = 3, MaxLength = 32, Description = "a short title")] public string title;
        public QuestKind kind;
        [JsonField(MinLength = 3, MaxLength = 20, Description = "who or what the quest is about")] public string target;
        [JsonField(Minimum = 10, Maximum = 500, Description = "gold paid on completion")] public int reward;
        [JsonField(MinItems = 1, MaxItems = 3, MaxLength = 40)] public List<string> steps;
    }

    /// <summary>The arguments of the gatekeeper's one tool.</summary>
    [Serializable]
    public sealed class OpenGateArgs
    {
        [JsonField(Enum = new[] { "north", "south", "river" })] public string gate;
        [JsonField(MaxLength = 40, Description = "why the gate opens")] public string reason;
    }

    /// <summary>
    /// NPCs that act, not just talk: a guard chooses one of the game's actions (the reply is exactly
    /// one <see cref="GuardAction"/> name), a quest giver returns a <see cref="Quest"/> object
    /// filled within its bounds, and a gatekeeper calls the game's <c>open_gate</c> function with
    /// typed arguments. Add this component to an empty GameObject and press Play; it makes the daemon
    /// component and the NPCs itself and draws its own UI.
    /// </summary>
    public sealed class NpcActionsDemo : MonoBehaviour
    {
        [AdapterName] public string guardAdapter = "";
        [AdapterName] public string questGiverAdapter = "";
        [AdapterName] public string gatekeeperAdapter = "";

        LoraloomNpc _guard, _questGiver, _gatekeeper;
        CancellationTokenSource _cancel = new CancellationTokenSource();
        string _situation = "A goblin charges at you with a rusty sword.";
        string _guardLine = "", _questLine = "", _gateLine = "", _error = "";

        void Awake()
        {
            if (LoraloomDaemon.Instance == null) new GameObject("Loraloom Daemon").AddComponent<LoraloomDaemon>();
            _guard = MakeNpc("Guard", guardAdapter, "You are a town guard. Pick the one action that fits the situation.");
            _questGiver = MakeNpc("Quest giver", questGiverAdapter, "You are a tavern keeper who hands out quests as JSON.");
            _gatekeeper = MakeNpc("Gatekeeper", gatekeeperAdapter, "You keep the town's gates and open them for good reasons.");
            // One constraint per line: schema and choice lines of this NPC go out without its tools.
            _gatekeeper.Tools = new List<Tool> { Tool.For<OpenGateArgs>("open_gate", "Open one of the town's gates") };
            _gatekeeper.toolChoice = ToolChoice.Auto;
            _gatekeeper.ToolCalled.AddListener(OnToolCalled);
            _gatekeeper.keepHistory = false; // tool definitions take room in the prompt
        }

        LoraloomNpc MakeNpc(string displayName, string adapter, string persona)
        {
            var npc = new GameObject(displayName).AddComponent<LoraloomNpc>();
            npc.transform.SetParent(transform, false);
            npc.adapter = adapter;
            npc.systemPrompt = persona;
            npc.maxTokens = 160;
            npc.RequestFailed.AddListener((code, message) => _error = displayName + ": " + code + ": " + message);
            return npc;
        }

        async void ChooseAction()
        {
            try
            {
                GuardAction action = await _guard.AskChoiceAsync<GuardAction>(_situation, _cancel.Token);
                _guardLine = "The guard chose: " + action;
                Play(action);
            }
            catch (OperationCanceledException) { _guardLine = "cancelled"; }
            catch (LoraloomException) { } // RequestFailed showed it
        }

        void Play(GuardAction action)
        {
            // The game's own code runs the move: no parsing, no free text to interpret.
            switch (action)
            {
                case GuardAction.attack: Debug.Log("guard swings"); break;
                case GuardAction.block: Debug.Log("guard raises the shield"); break;
                case GuardAction.flee: Debug.Log("guard runs for the gate"); break;
                case GuardAction.parley: Debug.Log("guard lowers the spear and talks"); break;
            }
        }

        async void AskForQuest()
        {
            try
            {
                Quest quest = await _questGiver.AskJsonAsync<Quest>("Any work for a traveller?", _cancel.Token);
                _questLine = quest.title + " (" + quest.kind + " " + quest.target + ", " + quest.reward + " gold)\n- "
                    + string.Join("\n- ", quest.steps.ToArray());
            }
            catch (OperationCanceledException) { _questLine = "cancelled"; }
            catch (LoraloomException e)
            {
                // "incomplete": the reply ran out of max_tokens before the JSON closed.
                if (e.Code == ResultConstraint.Incomplete) _questLine = "the quest did not fit in " + _questGiver.maxTokens + " tokens";
            }
        }

        async void AskAtTheGate()
        {
            try
            {
                // With toolChoice auto the reply is text or one call; calls also fire ToolCalled.
                IList<ToolCall> calls = await _gatekeeper.AskToolCallsAsync("Please let me through, the bridge is out.", _cancel.Token);
                if (calls.Count == 0) _gateLine = "The gatekeeper only talked.";
            }
            catch (OperationCanceledException) { _gateLine = "cancelled"; }
            catch (LoraloomException) { }
        }

        void OnToolCalled(string function, Dictionary<string, object> arguments)
        {
            if (function != "open_gate") return;
            // Typed arguments, read the way JsonUtility fills a class.
            OpenGateArgs args = JsonMapper.ToObject<OpenGateArgs>(arguments);
            _gateLine = "open_gate(" + args.gate + "): " + args.reason;
        }

        void CancelAll()
        {
            _cancel.Cancel();
            _cancel.Dispose();
            _cancel = new CancellationTokenSource();
        }

        void OnDestroy() { _cancel.Cancel(); }

        void OnGUI()
        {
            GUILayout.BeginArea(new Rect(10, 10, Screen.width - 20, Screen.height - 20));
            LoraloomDaemon daemon = LoraloomDaemon.Instance;
            GUILayout.Label("Daemon: " + (daemon != null ? daemon.Status : "none"));
            _situation = GUILayout.TextField(_situation, GUILayout.MinWidth(300));
            GUILayout.BeginHorizontal();
            if (GUILayout.Button("Guard: act", GUILayout.Width(120))) ChooseAction();
            if (GUILayout.Button("Ask for a quest", GUILayout.Width(120))) AskForQuest();
            if (GUILayout.Button("Ask at the gate", GUILayout.Width(120))) AskAtTheGate();
            if (GUILayout.Button("Cancel", GUILayout.Width(80))) CancelAll();
            GUILayout.EndHorizontal();
            GUILayout.Label(_guardLine);
            GUILayout.TextArea(_questLine, GUILayout.MinHeight(80));
            GUILayout.Label(_gateLine);
            if (_error.Length > 0) GUILayout.Label("error " + _error);
            GUILayout.EndArea();
        }
    }
}
