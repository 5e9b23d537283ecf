using System;
using System.Collections;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Reflection;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>The codec against every golden frame of tests/fixtures/frames, both ways.</summary>
    [TestFixture]
    public class GoldenFrameTests
    {
        public static IEnumerable<string> FrameNames()
        {
            string dir = TestEnv.FramesDir;
            // Outside the repository (a game project) there are no frames: one placeholder case says so.
            if (!Directory.Exists(dir)) return new[] { "<no golden frames at " + dir + "; set LORALOOM_TEST_FRAMES>" };
            return Directory.GetFiles(dir, "*.msgpack").Select(Path.GetFileNameWithoutExtension).OrderBy(n => n, StringComparer.Ordinal).ToList();
        }

        static byte[] Bytes(string name)
        {
            if (name.StartsWith("<")) Assert.Ignore(name);
            return File.ReadAllBytes(Path.Combine(TestEnv.FramesDir, name + ".msgpack"));
        }

        // The JSON twin with {"$bin": base64} turned back into bytes, so it compares with msgpack bin.
        static object Expected(string name)
        {
            if (name.StartsWith("<")) Assert.Ignore(name);
            return Unbin(Json.Parse(File.ReadAllText(Path.Combine(TestEnv.FramesDir, name + ".json"))));
        }

        static object Unbin(object value)
        {
            var map = value as Dictionary<string, object>;
            if (map != null)
            {
                if (map.Count == 1 && map.ContainsKey("$bin")) return Convert.FromBase64String((string)map["$bin"]);
                var copy = new Dictionary<string, object>();
                foreach (var pair in map) copy[pair.Key] = Unbin(pair.Value);
                return copy;
            }
            var list = value as List<object>;
            if (list != null) return list.ConvertAll(Unbin);
            return value;
        }

        [Test]
        public void EveryMessageTypeHasAGoldenFrame()
        {
            var types = new HashSet<string>();
            foreach (string name in FrameNames())
                types.Add((string)((Dictionary<string, object>)Expected(name))["type"]);
            CollectionAssert.AreEquivalent(Protocol.TypeNames, types, "message types of the C# protocol vs the golden frames");
        }

        [Test]
        public void EveryErrorCodeHasItsMeaning()
        {
            // ErrorCodes.g.cs is generated from bridge/errors.py: every code constant, the clients' own
            // included, is in the table of meanings, and the table has nothing else.
            var protocolCodes = typeof(ErrorCodes).GetFields(BindingFlags.Public | BindingFlags.Static)
                .Where(f => f.IsLiteral).Select(f => (string)f.GetRawConstantValue()).ToList();
            CollectionAssert.AreEquivalent(protocolCodes, ErrorCodes.Meanings.Keys);
            foreach (string code in protocolCodes) Assert.IsNotEmpty(ErrorCodes.MeaningOf(code), code);
            Assert.IsNull(ErrorCodes.MeaningOf("no_such_code"));
            CollectionAssert.IsSubsetOf(ErrorCodes.ClientOnly, protocolCodes);
        }

        [Test]
        public void CreateMakesEveryTypeName()
        {
            CollectionAssert.AreEqual(Protocol.ClientTypeNames.Concat(Protocol.ServerTypeNames), Protocol.TypeNames);
            foreach (string type in Protocol.TypeNames) Assert.AreEqual(type, Protocol.Create(type).Type);
            Assert.IsNull(Protocol.Create("teleport"));
        }

        [Test, TestCaseSource("FrameNames")]
        public void GenericDecodeEqualsTheJsonValue(string name)
        {
            var reader = new MsgPackReader(Bytes(name));
            object decoded = reader.ReadValue();
            Assert.IsTrue(reader.AtEnd, "bytes left after the map");
            AssertSameValue(Expected(name), decoded, name);
        }

        [Test, TestCaseSource("FrameNames")]
        public void GenericEncodeOfTheJsonValueEqualsTheBytes(string name)
        {
            var writer = new MsgPackWriter(16);
            writer.WriteValue(Expected(name));
            AssertSameBytes(Bytes(name), writer.ToArray(), name);
        }

        [Test, TestCaseSource("FrameNames")]
        public void TypedDecodeThenEncodeGivesTheSameBytes(string name)
        {
            byte[] bytes = Bytes(name);
            ProtocolMessage message = Protocol.Decode(bytes);
            var json = (Dictionary<string, object>)Expected(name);
            Assert.AreEqual(json["type"], message.Type);
            object id;
            json.TryGetValue("id", out id);
            Assert.AreEqual(id, message.RequestId);
            AssertSameBytes(bytes, Protocol.Encode(message), name);
        }

        [Test, TestCaseSource("FrameNames")]
        public void TypedDecodeIgnoresFieldOrderAndUnknownFields(string name)
        {
            // Field order is free on the wire and a newer daemon may add fields: reverse the map,
            // add a field nobody knows, and the message must still encode to the canonical bytes.
            var json = (Dictionary<string, object>)Expected(name);
            var shuffled = new Dictionary<string, object>();
            shuffled["x_future_field"] = new List<object> { 1L, "two", null };
            foreach (var pair in json.Reverse()) shuffled[pair.Key] = pair.Value;
            var writer = new MsgPackWriter();
            writer.WriteValue(shuffled);
            ProtocolMessage message = Protocol.Decode(writer.ToArray());
            AssertSameBytes(Bytes(name), Protocol.Encode(message), name);
        }

        [Test]
        public void TypedFieldsCarryTheGoldenValues()
        {
            if (!Directory.Exists(TestEnv.FramesDir)) Assert.Ignore("no golden frames at " + TestEnv.FramesDir);
            var welcome = (Welcome)Protocol.Decode(Bytes("welcome"));
            var json = (Dictionary<string, object>)Expected("welcome");
            var limits = (Dictionary<string, object>)json["limits"];
            Assert.AreEqual((long)limits["max_frame_bytes"], welcome.Limits.MaxFrameBytes);
            Assert.AreEqual((long)limits["max_adapters_per_request"], welcome.Limits.MaxAdaptersPerRequest);
            var image = (Dictionary<string, object>)json["image_model"];
            Assert.AreEqual(image["placeholder"], welcome.ImageModel.Placeholder);
            Assert.IsNull(welcome.ImageModel.ContextLength, "absent nullable field must read as null");
            var adapters = (List<object>)json["adapters"];
            Assert.AreEqual(adapters.Count, welcome.Adapters.Count);
            Assert.AreEqual(((Dictionary<string, object>)adapters[0])["name"], welcome.Adapters[0].Name);

            var chat = (Generate)Protocol.Decode(Bytes("generate_chat"));
            var chatJson = (Dictionary<string, object>)Expected("generate_chat");
            Assert.IsNull(chat.Prompt);
            Assert.IsNull(chat.Seed);
            var messages = (List<object>)chatJson["messages"];
            Assert.AreEqual(((Dictionary<string, object>)messages[1])["content"], chat.Messages[1].Content);
            Assert.AreEqual(((Dictionary<string, object>)((List<object>)chatJson["adapters"])[0])["scale"], chat.Adapters[0].Scale);

            var image2 = (ImageResult)Protocol.Decode(Bytes("image_result"));
            var imageJson = (Dictionary<string, object>)Expected("image_result");
            CollectionAssert.AreEqual((byte[])((List<object>)imageJson["images"])[0], image2.Images[0]);
            Assert.IsNull(image2.Timings.TokensPerS);

            var noId = (Error)Protocol.Decode(Bytes("error_no_id"));
            Assert.IsNull(noId.Id);
            Assert.AreEqual(((Dictionary<string, object>)Expected("error_no_id"))["code"], noId.Code);
        }

        static void AssertSameBytes(byte[] expected, byte[] actual, string name)
        {
            if (expected.SequenceEqual(actual)) return;
            int at = 0;
            while (at < Math.Min(expected.Length, actual.Length) && expected[at] == actual[at]) at++;
            Assert.Fail(name + ": bytes differ at offset " + at + " (expected " + expected.Length + " bytes, got "
                + actual.Length + ")\nexpected " + BitConverter.ToString(expected) + "\nactual   " + BitConverter.ToString(actual));
        }

        // Deep equality that also checks key order, since canonical frames keep maps in field order.
        static void AssertSameValue(object expected, object actual, string path)
        {
            if (expected == null || actual == null)
            {
                Assert.AreEqual(expected, actual, path);
                return;
            }
            var em = expected as Dictionary<string, object>;
            if (em != null)
            {
                var am = actual as Dictionary<string, object>;
                Assert.IsNotNull(am, path + ": expected a map, got " + actual.GetType().Name);
                CollectionAssert.AreEqual(em.Keys.ToList(), am.Keys.ToList(), path + ": keys (in order)");
                foreach (var pair in em) AssertSameValue(pair.Value, am[pair.Key], path + "." + pair.Key);
                return;
            }
            var el = expected as IList;
            if (el != null && !(expected is byte[]))
            {
                var al = actual as IList;
                Assert.IsNotNull(al, path + ": expected a list, got " + actual.GetType().Name);
                Assert.AreEqual(el.Count, al.Count, path + ": length");
                for (int i = 0; i < el.Count; i++) AssertSameValue(el[i], al[i], path + "[" + i + "]");
                return;
            }
            var eb = expected as byte[];
            if (eb != null)
            {
                CollectionAssert.AreEqual(eb, actual as byte[], path);
                return;
            }
            // JSON keeps 1 and 1.0 apart and so does msgpack: the runtime types must match too.
            Assert.AreEqual(expected.GetType(), actual.GetType(), path + ": value type");
            Assert.AreEqual(expected, actual, path);
        }
    }
}
