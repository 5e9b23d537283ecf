using System;
using System.Collections.Generic;
using System.Linq;
using System.Threading;
using System.Threading.Tasks;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>
    /// <see cref="Conversation"/> against the shared daemon (a tiny random model on a 256-token
    /// context): trimming to the daemon's token budget, saving, order, stop, failures.
    /// </summary>
    [TestFixture]
    public class ConversationTests
    {
        const string Persona = "You are Salty Meg, the quartermaster.";
        LoraloomClient _client;

        [SetUp]
        public void Connect()
        {
            _client = TestEnv.Await(LoraloomClient.ConnectAsync(new LoraloomClientOptions
            {
                Url = TestEnv.Url,
                Token = TestEnv.Token,
                ClientName = "nunit-conversation",
            }));
        }

        [TearDown]
        public void Close()
        {
            if (_client != null) TestEnv.Run(() => _client.CloseAsync(), TimeSpan.FromSeconds(10));
        }

        static Generate Settings(string adapter, int maxTokens, long? seed = null)
        {
            var settings = new Generate { MaxTokens = maxTokens, Temperature = 0.0, Seed = seed };
            if (adapter != null) settings.Adapters.Add(new AdapterRef(adapter));
            return settings;
        }

        static List<string> Roles(IEnumerable<ChatMessage> messages) { return messages.Select(m => m.Role).ToList(); }

        [Test]
        public void A200TurnConversationKeepsAnsweringOnA256TokenContext()
        {
            int context = _client.Welcome.TextModel.ContextLength ?? 0;
            Assert.AreEqual(256, context, "the shared test daemon runs a 256-token context");
            var meg = new Conversation(Persona);
            var drops = new List<int>();
            for (int turn = 0; turn < 200; turn++)
            {
                string line = "Turn " + turn + ": where is the rum hidden?";
                Completion done = TestEnv.Await(meg.AskAsync(_client, line, Settings("alpha", 16)));
                Assert.That(done.FinishReason, Is.EqualTo(FinishReason.Stop).Or.EqualTo(FinishReason.Length), "turn " + turn);
                Assert.LessOrEqual(done.PromptTokens + 16, context, "turn " + turn);
                drops.Add(done.DroppedMessages);
                IList<ChatMessage> history = meg.History;
                Assert.AreEqual(ChatRole.User, history[0].Role, "the kept history starts with a whole turn");
                Assert.AreEqual(line, history[history.Count - 2].Content);
                Assert.AreEqual(done.Text, history[history.Count - 1].Content);
                for (int i = 0; i < history.Count; i++)
                    Assert.AreEqual(i % 2 == 0 ? ChatRole.User : ChatRole.Assistant, history[i].Role, "turn " + turn + ", message " + i);
                Assert.AreEqual(ChatRole.System, meg.MessagesFor("next")[0].Role, "the persona always goes first");
            }
            Assert.Greater(drops.Sum(), 150, "old turns were dropped along the way");
            Assert.IsTrue(drops.All(d => d % 2 == 0), "whole turns only");
            var trims = drops.Where(d => d > 0).ToList();
            // Cut to 3/4 of the budget: each trim drops several turns, so most lines keep the previous prefix.
            Assert.GreaterOrEqual(trims.Average(), 4.0, string.Join(",", drops));
            Assert.Less(meg.History.Count, 40);
        }

        [Test]
        public void HistorySavesAsPlainJsonAndRestores()
        {
            var first = new Conversation(Persona);
            foreach (string line in new[] { "Ahoy!", "Any rum \"left\"?\nSay it.", "Où? ✓" })
                TestEnv.Await(first.AskAsync(_client, line, Settings("beta", 8, 3)));
            string saved = first.ToJson();
            var parsed = (Dictionary<string, object>)Json.Parse(saved);
            CollectionAssert.AreEqual(new[] { "system_prompt", "history" }, parsed.Keys);
            Assert.AreEqual(Persona, parsed["system_prompt"]);
            var turns = (List<object>)parsed["history"];
            Assert.AreEqual(6, turns.Count);
            Assert.AreEqual("Any rum \"left\"?\nSay it.", ((Dictionary<string, object>)turns[2])["content"]);

            Conversation restored = Conversation.FromJson(saved);
            Assert.AreEqual(Persona, restored.SystemPrompt);
            CollectionAssert.AreEqual(first.History.Select(m => m.Role + "|" + m.Content), restored.History.Select(m => m.Role + "|" + m.Content));
            Completion again = TestEnv.Await(restored.AskAsync(_client, "And then?", Settings("beta", 8, 3)));
            Completion original = TestEnv.Await(first.AskAsync(_client, "And then?", Settings("beta", 8, 3)));
            Assert.AreEqual(original.Text, again.Text, "the same messages and seed give the same reply");
            Assert.AreEqual(original.PromptTokens, again.PromptTokens);

            // The Python client's json.dumps writes the same form; its escapes read back too.
            Conversation python = Conversation.FromJson("{\"system_prompt\": \"Meg\", \"history\": [{\"role\": \"user\", \"content\": \"caf\\u00e9 \\ud83c\\udfb2\"}, "
                + "{\"role\": \"assistant\", \"content\": \"aye\"}]}");
            Assert.AreEqual("café 🎲", python.History[0].Content);
            Assert.AreEqual(python.ToJson(), Conversation.FromJson(python.ToJson()).ToJson());

            string before = restored.ToJson();
            foreach (string bad in new[] { "{\"history\": [{\"role\": \"narrator\", \"content\": \"x\"}]}", "{\"system_prompt\": 3, \"history\": []}",
                "[1, 2]", "{\"system_prompt\": \"x\"}", "not json" })
            {
                Assert.Throws<FormatException>(() => restored.LoadJson(bad), bad);
            }
            Assert.AreEqual(before, restored.ToJson(), "a refused save changes nothing");
            Assert.Throws<ArgumentException>(() => restored.History = new List<ChatMessage> { new ChatMessage("narrator", "x") });
        }

        [Test]
        public void ConcurrentAsksAreAnsweredOneAtATimeInOrder()
        {
            var npc = new Conversation(Persona);
            var lines = new[] { "one", "two", "three" };
            // All three are asked before the first is answered.
            Task<Completion>[] asks = lines.Select(line => npc.AskAsync(_client, line, Settings("gamma", 12))).ToArray();
            Assert.IsTrue(npc.IsBusy);
            Assert.IsTrue(Task.WaitAll(asks, TestEnv.Patience), "every line is answered");
            Assert.IsFalse(npc.IsBusy);
            IList<ChatMessage> history = npc.History;
            CollectionAssert.AreEqual(lines, history.Where(m => m.Role == ChatRole.User).Select(m => m.Content));
            CollectionAssert.AreEqual(asks.Select(t => t.Result.Text), history.Where(m => m.Role == ChatRole.Assistant).Select(m => m.Content));
            // Each line went out with the exchanges before it: its prompt is longer than the previous one's.
            Assert.Less(asks[0].Result.PromptTokens, asks[1].Result.PromptTokens);
            Assert.Less(asks[1].Result.PromptTokens, asks[2].Result.PromptTokens);
        }

        [Test]
        public void AFailedLineChangesNothingAndTheLinesBehindItGoOn()
        {
            var npc = new Conversation(Persona);
            TestEnv.Await(npc.AskAsync(_client, "hello", Settings("alpha", 6)));
            Task<Completion> failing = npc.AskAsync(_client, "boo", Settings("ghost", 6));
            Task<Completion> behind = npc.AskAsync(_client, "still there?", Settings("alpha", 6));
            LoraloomException e = LiveDaemonTests.Fault(failing);
            Assert.AreEqual(ErrorCodes.UnknownAdapter, e.Code);
            StringAssert.Contains("ghost", e.Reason);
            Assert.IsFalse(e.Reason.StartsWith(e.Code), "the reason does not repeat the code: " + e.Reason);
            Assert.AreEqual(e.Code + ": " + e.Reason, e.Message);
            TestEnv.Await(behind);
            CollectionAssert.AreEqual(new[] { "hello", "still there?" }, npc.History.Where(m => m.Role == ChatRole.User).Select(m => m.Content));
        }

        [Test]
        public void StopGenerationEndsTheLineWithWhatWasSaid()
        {
            // The random model may end an answer by itself before the stop lands: such an attempt
            // proves nothing, so a few are made.
            for (int attempt = 0; attempt < 3; attempt++)
            {
                if (StopOnce(attempt)) return;
            }
            Assert.Fail("every attempt ended by itself before StopGeneration landed");
        }

        bool StopOnce(int attempt)
        {
            var npc = new Conversation(Persona);
            var settings = Settings("beta", 200, attempt);
            settings.Temperature = 0.8;
            settings.RepetitionPenalty = 5.0; // keeps the end-of-turn token unlikely: long answers
            settings.Stop.Clear();
            var pieces = new List<string>();
            var streaming = new ManualResetEventSlim();
            Task<Completion> line = npc.AskAsync(_client, "Tell me a very long story.", settings, piece =>
            {
                lock (pieces) pieces.Add(piece);
                streaming.Set();
            });
            Task<Completion> next = npc.AskAsync(_client, "And the end?", Settings("alpha", 4));
            Assert.IsTrue(streaming.Wait(TestEnv.Patience), "the reply streams");
            npc.StopGeneration();
            Completion stopped = TestEnv.Await(line);
            TestEnv.Await(next);
            if (stopped.FinishReason != FinishReason.Cancelled) return false;
            string heard;
            lock (pieces) heard = string.Concat(pieces);
            Assert.IsNotEmpty(stopped.Text);
            Assert.IsTrue(heard.StartsWith(stopped.Text) || stopped.Text.StartsWith(heard), "the reply is what streamed until the stop");
            IList<ChatMessage> history = npc.History;
            Assert.AreEqual(4, history.Count, "the stopped line is recorded with its partial reply, then the next one");
            Assert.AreEqual(stopped.Text, history[1].Content);
            Assert.AreEqual("And the end?", history[2].Content);
            return true;
        }

        [Test]
        public void ALineCancelledWhileWaitingForItsTurnLeavesTheOrder()
        {
            var npc = new Conversation(Persona);
            var settings = Settings("alpha", 60);
            settings.Stop.Clear();
            var cts = new CancellationTokenSource();
            Task<Completion> first = npc.AskAsync(_client, "first", settings);
            Task<Completion> cancelled = npc.AskAsync(_client, "never sent", Settings("alpha", 4), null, cts.Token);
            Task<Completion> third = npc.AskAsync(_client, "third", Settings("alpha", 4));
            cts.Cancel();
            try
            {
                cancelled.Wait(TestEnv.Patience);
                Assert.Fail("the cancelled line finished");
            }
            catch (AggregateException e)
            {
                Assert.IsInstanceOf<OperationCanceledException>(e.InnerException);
            }
            Assert.IsTrue(Task.WaitAll(new Task[] { first, third }, TestEnv.Patience));
            CollectionAssert.AreEqual(new[] { "first", "third" }, npc.History.Where(m => m.Role == ChatRole.User).Select(m => m.Content));
            Assert.Less(first.Result.PromptTokens, third.Result.PromptTokens, "the third line went out after the first");
        }

        [Test]
        public void AHistoryReplacedDuringALineIsKept()
        {
            var npc = new Conversation();
            var saved = new List<ChatMessage> { new ChatMessage(ChatRole.User, "from the save"), new ChatMessage(ChatRole.Assistant, "aye") };
            bool replaced = false;
            TestEnv.Await(npc.AskAsync(_client, "hello", Settings("alpha", 12), piece =>
            {
                if (replaced) return;
                replaced = true;
                npc.History = saved;
            }));
            Assert.IsTrue(replaced, "the reply streamed");
            CollectionAssert.AreEqual(new[] { "from the save", "aye" }, npc.History.Select(m => m.Content));
        }

        [Test]
        public void MaxHistoryTurnsAndKeepHistoryBoundWhatIsSent()
        {
            var npc = new Conversation(Persona) { MaxHistoryTurns = 2 };
            // A save that starts with a system note and a stray assistant message.
            npc.History = new List<ChatMessage>
            {
                new ChatMessage(ChatRole.System, "The player is a ghost."),
                new ChatMessage(ChatRole.Assistant, "Who's there?"),
                new ChatMessage(ChatRole.User, "boo"),
                new ChatMessage(ChatRole.Assistant, "eek"),
            };
            TestEnv.Await(npc.AskAsync(_client, "again", Settings("alpha", 4)));
            TestEnv.Await(npc.AskAsync(_client, "and again", Settings("alpha", 4)));
            IList<ChatMessage> history = npc.History;
            CollectionAssert.AreEqual(new[] { ChatRole.System, ChatRole.User, ChatRole.Assistant, ChatRole.User, ChatRole.Assistant }, Roles(history));
            Assert.AreEqual("The player is a ghost.", history[0].Content, "leading system messages stay, like the persona");
            CollectionAssert.AreEqual(new[] { "again", "and again" }, history.Where(m => m.Role == ChatRole.User).Select(m => m.Content));

            npc.KeepHistory = false;
            CollectionAssert.AreEqual(new[] { ChatRole.System, ChatRole.User }, Roles(npc.MessagesFor("hi")));
            TestEnv.Await(npc.AskAsync(_client, "forgotten", Settings("alpha", 4)));
            Assert.AreEqual(5, npc.History.Count, "nothing recorded without history");
        }
    }
}
