using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Linq;
using System.Text.RegularExpressions;
using System.Threading;
using System.Threading.Tasks;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    public enum Mood { calm, angry, curious }

    public sealed class QuestItem
    {
        [JsonField(MinLength = 1, MaxLength = 10)] public string name;
        [JsonField(Minimum = 1, Maximum = 99)] public int count;
    }

    public sealed class Reward
    {
        [JsonField(Minimum = 5, Maximum = 250)] public int gold;
        public bool urgent;
    }

    /// <summary>A quest as game code declares it: bounded strings and numbers, an enum, a list, a nested class.</summary>
    public sealed class Quest
    {
        [JsonField(MaxLength = 16, Description = "a short title")] public string title;
        public Mood mood;
        public Reward reward;
        [JsonField(MinItems = 1, MaxItems = 3)] public List<QuestItem> items;
    }

    public sealed class GiveArgs
    {
        [JsonField(MaxLength = 12)] public string item;
        [JsonField(Minimum = 1, Maximum = 5)] public int count;
    }

    public struct Point
    {
        public int x;
        public int y;
    }

    /// <summary>Every kind of field the schema builder and the mapper know.</summary>
    public sealed class Everything
    {
        public static int Ignored = 1;
        public readonly int AlsoIgnored = 2;
        [NonSerialized] public int NotSerialized = 3;
        public byte small;
        [JsonField(Minimum = -5.5, Maximum = 1e12)] public int clamped;
        public long big;
        public ulong unsigned;
        [JsonField(Minimum = 0.5)] public float ratio;
        public char letter;
        [JsonField(MaxItems = 2, MaxLength = 4, Pattern = "^[a-z]+$")] public string[] tags;
        public Dictionary<string, int> stock;
        public object anything;
        public Point where;
        public Mood? maybe;
        [JsonField(Enum = new[] { "red", "blue" })] public string colour = "red";
    }

    /// <summary>
    /// Structured output through the client against the real daemons of tests/unity/test_unity.py:
    /// JSON schemas (as dictionaries and from C# classes), choices, regexes, grammars and tool calls,
    /// checked against their constraints here; refused constraints; cancelling a constrained request.
    /// The schemas bound every string and number: the tiny random model would otherwise write digits
    /// until max_tokens.
    /// </summary>
    [TestFixture]
    public class StructuredTests
    {
        const string QuestSchema = @"{""type"": ""object"", ""additionalProperties"": false,
            ""required"": [""title"", ""reward"", ""kind"", ""items"", ""urgent""],
            ""properties"": {
                ""title"": {""type"": ""string"", ""maxLength"": 16},
                ""reward"": {""type"": ""integer"", ""minimum"": 5, ""maximum"": 250},
                ""kind"": {""enum"": [""fetch"", ""escort"", ""slay""]},
                ""items"": {""type"": ""array"", ""minItems"": 1, ""maxItems"": 3, ""items"": {
                    ""type"": ""object"", ""additionalProperties"": false, ""required"": [""name"", ""count""],
                    ""properties"": {""name"": {""type"": ""string"", ""minLength"": 1, ""maxLength"": 10},
                                   ""count"": {""type"": ""integer"", ""minimum"": 1, ""maximum"": 99}}}},
                ""urgent"": {""type"": ""boolean""}}}";
        const string DoorSchema = @"{""type"": ""object"", ""required"": [""door""],
            ""properties"": {""door"": {""enum"": [""gate"", ""cellar"", ""tower""]}}}";

        LoraloomClient _client;

        [SetUp]
        public void Connect()
        {
            _client = TestEnv.Await(LoraloomClient.ConnectAsync(TestEnv.Url, TestEnv.Token));
        }

        [TearDown]
        public void Close()
        {
            if (_client != null) TestEnv.Run(() => _client.CloseAsync(), TimeSpan.FromSeconds(10));
        }

        static Dictionary<string, object> Schema(string json) { return (Dictionary<string, object>)Json.Parse(json); }

        static Generate Line(string text, int seed, params AdapterRef[] adapters)
        {
            var request = new Generate
            {
                Messages = new List<ChatMessage> { new ChatMessage(ChatRole.User, text) },
                MaxTokens = 200,
                Temperature = 0.9,
                Seed = seed,
            };
            request.Adapters.AddRange(adapters);
            return request;
        }

        /// <summary>
        /// A string's length as JSON Schema counts it: Unicode code points (a C# string's Length
        /// counts UTF-16 units, two for a character outside the BMP, which the tiny model writes).
        /// </summary>
        internal static int CodePoints(string text)
        {
            int count = 0;
            foreach (char c in text) if (!char.IsLowSurrogate(c)) count++;
            return count;
        }

        static T Field<T>(Dictionary<string, object> map, string key)
        {
            Assert.IsTrue(map.ContainsKey(key), "missing '" + key + "'");
            Assert.IsInstanceOf<T>(map[key], key);
            return (T)map[key];
        }

        // ------------------------------------------------------------ without a daemon

        [Test]
        public void SchemasDescribeThePublicFieldsOfAClass()
        {
            string expected = "{\"type\":\"object\",\"properties\":{"
                + "\"small\":{\"type\":\"integer\",\"minimum\":0,\"maximum\":255},"
                + "\"clamped\":{\"type\":\"integer\",\"minimum\":-5,\"maximum\":2147483647},"
                + "\"big\":{\"type\":\"integer\"},"
                + "\"unsigned\":{\"type\":\"integer\",\"minimum\":0},"
                + "\"ratio\":{\"type\":\"number\",\"minimum\":0.5},"
                + "\"letter\":{\"type\":\"string\",\"minLength\":1,\"maxLength\":1},"
                + "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\",\"maxLength\":4,\"pattern\":\"^[a-z]+$\"},\"maxItems\":2},"
                + "\"stock\":{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\",\"minimum\":-2147483648,\"maximum\":2147483647}},"
                + "\"anything\":{},"
                + "\"where\":{\"type\":\"object\",\"properties\":{"
                + "\"x\":{\"type\":\"integer\",\"minimum\":-2147483648,\"maximum\":2147483647},"
                + "\"y\":{\"type\":\"integer\",\"minimum\":-2147483648,\"maximum\":2147483647}},"
                + "\"required\":[\"x\",\"y\"],\"additionalProperties\":false},"
                + "\"maybe\":{\"type\":\"string\",\"enum\":[\"calm\",\"angry\",\"curious\"]},"
                + "\"colour\":{\"type\":\"string\",\"enum\":[\"red\",\"blue\"]}},"
                + "\"required\":[\"small\",\"clamped\",\"big\",\"unsigned\",\"ratio\",\"letter\",\"tags\",\"stock\",\"anything\",\"where\",\"maybe\",\"colour\"],"
                + "\"additionalProperties\":false}";
            Assert.AreEqual(expected, Json.Write(JsonSchema.For<Everything>()));
            Dictionary<string, object> quest = JsonSchema.For<Quest>();
            var title = (Dictionary<string, object>)((Dictionary<string, object>)quest["properties"])["title"];
            Assert.AreEqual("a short title", title["description"]);
            Dictionary<string, object> tool = Tool.For<GiveArgs>("give_item", "Give").Parameters;
            Assert.AreEqual("{\"type\":\"object\",\"properties\":{\"item\":{\"type\":\"string\",\"maxLength\":12},"
                + "\"count\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":5}},\"required\":[\"item\",\"count\"],"
                + "\"additionalProperties\":false}", Json.Write(tool));
            Assert.Throws<ArgumentException>(() => JsonSchema.For<Dictionary<int, string>>());
            Assert.Throws<ArgumentException>(() => JsonSchema.For<Action>());
        }

        [Test]
        public void TheMapperFillsFieldsTheWayJsonUtilityDoes()
        {
            object tree = Json.Parse("{\"small\": 7, \"clamped\": -5, \"big\": 9007199254740993, \"unsigned\": 18446744073709551615,"
                + " \"ratio\": 2, \"letter\": \"q\", \"tags\": [\"ab\", \"cd\"], \"stock\": {\"rope\": 3},"
                + " \"anything\": [1, \"two\"], \"where\": {\"x\": 1, \"y\": -2}, \"maybe\": 2, \"unknown\": true}");
            var value = JsonMapper.ToObject<Everything>(tree);
            Assert.AreEqual(7, value.small);
            Assert.AreEqual(-5, value.clamped);
            Assert.AreEqual(9007199254740993L, value.big);
            Assert.AreEqual(ulong.MaxValue, value.unsigned);
            Assert.AreEqual(2f, value.ratio);
            Assert.AreEqual('q', value.letter);
            CollectionAssert.AreEqual(new[] { "ab", "cd" }, value.tags);
            Assert.AreEqual(3, value.stock["rope"]);
            CollectionAssert.AreEqual(new object[] { 1L, "two" }, (List<object>)value.anything);
            Assert.AreEqual(1, value.where.x);
            Assert.AreEqual(-2, value.where.y);
            Assert.AreEqual(Mood.curious, value.maybe, "enums read from numbers too");
            Assert.AreEqual("red", value.colour, "a field without a key keeps its value");

            var quest = JsonMapper.ToObject<Quest>(Json.Parse("{\"title\": \"Rats\", \"mood\": \"angry\", \"reward\": {\"gold\": 9, \"urgent\": true},"
                + " \"items\": [{\"name\": \"cheese\", \"count\": 2}]}"));
            Assert.AreEqual("Rats", quest.title);
            Assert.AreEqual(Mood.angry, quest.mood);
            Assert.AreEqual(9, quest.reward.gold);
            Assert.IsTrue(quest.reward.urgent);
            Assert.AreEqual("cheese", quest.items.Single().name);

            var wrongType = Assert.Throws<FormatException>(() => JsonMapper.ToObject<Quest>(Json.Parse("{\"reward\": {\"gold\": \"lots\"}}")));
            StringAssert.Contains("$.reward.gold", wrongType.Message);
            var overflow = Assert.Throws<FormatException>(() => JsonMapper.ToObject<Everything>(Json.Parse("{\"small\": 300}")));
            StringAssert.Contains("$.small", overflow.Message);
            Assert.Throws<FormatException>(() => JsonMapper.ToObject<Quest>(Json.Parse("{\"mood\": \"sleepy\"}")));
            Assert.Throws<FormatException>(() => JsonMapper.ToObject<Everything>(Json.Parse("{\"small\": 1.5}")));
            Assert.IsNull(JsonMapper.ToObject<Quest>(null));
        }

        // ------------------------------------------------------------ against the daemon

        [Test]
        public void ASchemaCallReturnsJsonValidAgainstIt()
        {
            Dictionary<string, object> schema = Schema(QuestSchema);
            var mixes = new[]
            {
                new AdapterRef[0],
                new[] { new AdapterRef("alpha") },
                new[] { new AdapterRef("beta", 0.5), new AdapterRef("gamma") },
            };
            var tasks = new List<Task<Completion>>();
            for (int i = 0; i < mixes.Length; i++)
            {
                Generate request = Line("Give me a quest.", 40 + i, mixes[i]);
                request.JsonSchema = schema;
                tasks.Add(_client.GenerateAsync(request));
            }
            Assert.IsTrue(Task.WaitAll(tasks.ToArray(), TestEnv.Patience), "the three constrained lines finish");
            foreach (Task<Completion> task in tasks)
            {
                Completion done = task.Result;
                Assert.AreEqual(ResultConstraint.Satisfied, done.Constraint, done.ToString());
                Assert.IsTrue(done.Satisfied);
                Assert.AreEqual(FinishReason.Stop, done.FinishReason);
                var quest = done.Json as Dictionary<string, object>;
                Assert.IsNotNull(quest, "an object: " + done.Text);
                CollectionAssert.AreEquivalent(new[] { "title", "reward", "kind", "items", "urgent" }, quest.Keys);
                Assert.LessOrEqual(CodePoints(Field<string>(quest, "title")), 16, Field<string>(quest, "title"));
                long reward = Field<long>(quest, "reward");
                Assert.That(reward, Is.InRange(5L, 250L));
                CollectionAssert.Contains(new[] { "fetch", "escort", "slay" }, Field<string>(quest, "kind"));
                Field<bool>(quest, "urgent");
                List<object> items = Field<List<object>>(quest, "items");
                Assert.That(items.Count, Is.InRange(1, 3));
                foreach (object item in items)
                {
                    var entry = (Dictionary<string, object>)item;
                    CollectionAssert.AreEquivalent(new[] { "name", "count" }, entry.Keys);
                    Assert.That(CodePoints(Field<string>(entry, "name")), Is.InRange(1, 10));
                    Assert.That(Field<long>(entry, "count"), Is.InRange(1L, 99L));
                }
                Assert.AreEqual(Json.Write(Json.Parse(done.Text)), Json.Write(done.Json), "the tree is the text parsed");
                Assert.IsEmpty(done.ToolCalls);
            }
            // The shortcut returns the same tree, and faults when the JSON was cut short.
            Generate again = Line("Give me a quest.", 40);
            again.JsonSchema = schema;
            object json = TestEnv.Await(_client.GenerateJsonAsync(again));
            Assert.AreEqual(Json.Write(tasks[0].Result.Json), Json.Write(json), "the same seed, the same quest");
            Generate cut = Line("Give me a quest.", 41);
            cut.JsonSchema = schema;
            cut.MaxTokens = 3;
            LoraloomException e = LiveDaemonTests.Fault(_client.GenerateJsonAsync(cut));
            Assert.AreEqual(ResultConstraint.Incomplete, e.Code);
            StringAssert.Contains(FinishReason.Length, e.Reason);
        }

        [Test]
        public void ATypedCallFillsTheClassWithinItsBounds()
        {
            for (int seed = 0; seed < 3; seed++)
            {
                Generate request = Line("A quest, please.", seed, new AdapterRef("gamma"));
                Quest quest = TestEnv.Await(_client.GenerateJsonAsync<Quest>(request));
                Assert.IsNull(request.JsonSchema, "the caller's request is not changed");
                Assert.IsNotNull(quest.title);
                Assert.LessOrEqual(CodePoints(quest.title), 16, quest.title);
                Assert.IsTrue(Enum.IsDefined(typeof(Mood), quest.mood));
                Assert.That(quest.reward.gold, Is.InRange(5, 250));
                Assert.That(quest.items.Count, Is.InRange(1, 3));
                foreach (QuestItem item in quest.items)
                {
                    Assert.That(CodePoints(item.name), Is.InRange(1, 10));
                    Assert.That(item.count, Is.InRange(1, 99));
                }
            }
        }

        [Test]
        public void ChoicesRegexesAndGrammarsShapeTheText()
        {
            var actions = new List<string> { "attack", "flee", "talk", "trade" };
            const string pattern = "[A-Z][a-z]{2,7} the (brave|bold)";
            const string grammar = "start: \"open the \" DOOR \"!\"\nDOOR: \"gate\" | \"cellar\" | \"tower\"\n";
            for (int seed = 0; seed < 4; seed++)
            {
                Generate choose = Line("The goblin attacks. What do you do?", seed, new AdapterRef("alpha"));
                choose.Choices = actions;
                Generate name = Line("Who are you?", seed, new AdapterRef("beta"));
                name.Regex = pattern;
                Generate door = Line("Which door?", seed);
                door.Grammar = grammar;
                Completion[] done = TestEnv.Await(Task.WhenAll(_client.GenerateAsync(choose), _client.GenerateAsync(name), _client.GenerateAsync(door)));
                foreach (Completion c in done) Assert.AreEqual(ResultConstraint.Satisfied, c.Constraint, c.ToString());
                CollectionAssert.Contains(actions, done[0].Text);
                Assert.IsNull(done[0].Json, "only a schema gives json");
                Assert.IsTrue(Regex.IsMatch(done[1].Text, "^(?:" + pattern + ")$"), done[1].Text);
                Assert.IsTrue(Regex.IsMatch(done[2].Text, "^open the (gate|cellar|tower)!$"), done[2].Text);
            }
        }

        [Test]
        public void ToolCallsComeBackAsData()
        {
            var door = new Tool("open_door", "Open a door", Schema(DoorSchema));
            Tool give = Tool.For<GiveArgs>("give_item", "Give an item");
            using (LoraloomClient tools = TestEnv.Await(LoraloomClient.ConnectAsync(TestEnv.ToolsUrl, TestEnv.Token)))
            {
                for (int seed = 0; seed < 3; seed++)
                {
                    Generate request = Line("Let me into the tower, and give me a sword.", seed, new AdapterRef("alpha"));
                    request.Temperature = 1.0;
                    request.MaxTokens = 80;
                    request.Tools = new List<Tool> { door, give };
                    request.ToolChoice = ToolChoice.Required;
                    Completion done = TestEnv.Await(tools.GenerateAsync(request));
                    Assert.AreEqual(ResultConstraint.Satisfied, done.Constraint, done.ToString());
                    Assert.AreEqual(1, done.ToolCalls.Count, done.Text);
                    ToolCall call = done.ToolCalls[0];
                    if (call.Name == "open_door")
                    {
                        CollectionAssert.AreEquivalent(new[] { "door" }, call.Arguments.Keys);
                        CollectionAssert.Contains(new[] { "gate", "cellar", "tower" }, call.Arguments["door"]);
                    }
                    else
                    {
                        Assert.AreEqual("give_item", call.Name);
                        CheckGive(call);
                    }
                }
                Generate named = Line("Let me into the tower, and give me a sword.", 9);
                named.Temperature = 0.0;
                named.MaxTokens = 80;
                named.Tools = new List<Tool> { door, give };
                named.ToolChoice = "give_item";
                Completion forced = TestEnv.Await(tools.GenerateAsync(named));
                Assert.AreEqual(ResultConstraint.Satisfied, forced.Constraint, forced.ToString());
                CollectionAssert.AreEqual(new[] { "give_item" }, forced.ToolCalls.Select(c => c.Name));
                CheckGive(forced.ToolCalls[0]);
                StringAssert.StartsWith("give_item {", forced.ToolCalls[0].ToString());

                named.ToolChoice = ToolChoice.None;
                named.MaxTokens = 8;
                Completion text = TestEnv.Await(tools.GenerateAsync(named));
                Assert.IsEmpty(text.ToolCalls);
                Assert.IsNull(text.Constraint, "tool_choice none: no constraint");
            }
        }

        static void CheckGive(ToolCall call)
        {
            CollectionAssert.AreEquivalent(new[] { "item", "count" }, call.Arguments.Keys);
            var args = call.ArgumentsAs<GiveArgs>();
            Assert.LessOrEqual(CodePoints(args.item), 12, args.item);
            Assert.That(args.count, Is.InRange(1, 5));
            Assert.AreEqual(args.count, (long)call.Arguments["count"]);
        }

        [Test]
        public void AnInvalidConstraintFaultsWithInvalidParameterAndTheConnectionGoesOn()
        {
            // A line streaming meanwhile is not disturbed by the refusals.
            Generate story = Line("Once upon a time", 1);
            story.MaxTokens = 40;
            story.Temperature = 0.0;
            var pieces = new List<string>();
            Task<Completion> streaming = _client.GenerateAsync(story, piece => { lock (pieces) pieces.Add(piece); });

            Generate schema = Line("Hi", 1);
            schema.JsonSchema = Schema("{\"type\": \"nonsense\"}");
            LoraloomException bad = LiveDaemonTests.Fault(_client.GenerateJsonAsync(schema));
            Assert.AreEqual(ErrorCodes.InvalidParameter, bad.Code);
            StringAssert.Contains("nonsense", bad.Reason);
            Generate regex = Line("Hi", 1);
            regex.Regex = "[a-";
            Assert.AreEqual(ErrorCodes.InvalidParameter, LiveDaemonTests.Fault(_client.GenerateAsync(regex)).Code);
            Generate grammar = Line("Hi", 1);
            grammar.Grammar = "start: nowhere\n";
            LoraloomException lark = LiveDaemonTests.Fault(_client.GenerateAsync(grammar));
            Assert.AreEqual(ErrorCodes.InvalidParameter, lark.Code);
            StringAssert.Contains("nowhere", lark.Reason);
            // Two constraints at once: the daemon's validation refuses the frame.
            Generate both = Line("Hi", 1);
            both.Regex = "a";
            both.Choices = new List<string> { "a" };
            Assert.AreEqual(ErrorCodes.BadMessage, LiveDaemonTests.Fault(_client.GenerateAsync(both)).Code);

            Completion whole = TestEnv.Await(streaming);
            Assert.That(whole.FinishReason, Is.EqualTo(FinishReason.Stop).Or.EqualTo(FinishReason.Length));
            lock (pieces) Assert.AreEqual(whole.Text, string.Concat(pieces));
            Generate good = Line("Hi", 2);
            good.Choices = new List<string> { "yes", "no" };
            CollectionAssert.Contains(good.Choices, TestEnv.Await(_client.GenerateAsync(good)).Text);
            Assert.AreEqual(ConnectionState.Connected, _client.State);
        }

        [Test]
        public void CancellingAConstrainedCallCancelsTheTaskAndTheRequest()
        {
            var results = new ConcurrentQueue<Result>();
            _client.MessageReceived += m => { var r = m as Result; if (r != null) results.Enqueue(r); };
            Generate request = Line("Tell me a story.", 3, new AdapterRef("beta"));
            request.Id = "cancel-json-" + Guid.NewGuid().ToString("N").Substring(0, 8);
            request.MaxTokens = 240;
            // At least 150 characters of story: far more tokens than the one chunk seen before cancelling.
            request.JsonSchema = Schema("{\"type\": \"object\", \"additionalProperties\": false, \"required\": [\"story\"],"
                + " \"properties\": {\"story\": {\"type\": \"string\", \"minLength\": 150, \"maxLength\": 200}}}");
            var cts = new CancellationTokenSource();
            int seen = 0;
            Task<object> task = _client.GenerateJsonAsync(request, piece =>
            {
                if (Interlocked.Increment(ref seen) == 1) cts.Cancel();
            }, cts.Token);
            try
            {
                task.Wait(TestEnv.Patience);
                Assert.Fail("the task finished instead of being cancelled");
            }
            catch (AggregateException e)
            {
                Assert.IsInstanceOf<OperationCanceledException>(e.InnerException);
            }
            Assert.IsTrue(task.IsCanceled);
            Result final = null;
            var clock = System.Diagnostics.Stopwatch.StartNew();
            while (final == null && clock.Elapsed < TestEnv.Patience)
            {
                final = results.FirstOrDefault(r => r.Id == request.Id);
                if (final == null) Thread.Sleep(20);
            }
            Assert.IsNotNull(final, "the daemon ended the cancelled request with a result");
            Assert.AreEqual(FinishReason.Cancelled, final.FinishReason);
            Assert.AreEqual(ResultConstraint.Incomplete, final.Constraint);
            Assert.IsNull(final.Json);
            Assert.AreEqual(1, seen, "no piece reached the callback after cancelling");
            Generate after = Line("Still there?", 4);
            after.Choices = new List<string> { "yes", "no" };
            Assert.IsTrue(TestEnv.Await(_client.GenerateAsync(after)).Satisfied);
        }
    }
}
