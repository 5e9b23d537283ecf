using System;
using System.Collections.Generic;
using NUnit.Framework;

namespace Loraloom.Core.Tests
{
    /// <summary>Canonical forms at every size boundary of the msgpack spec, and refusal of bad frames.</summary>
    [TestFixture]
    public class CodecTests
    {
        static byte[] Pack(object value)
        {
            var w = new MsgPackWriter(1);
            w.WriteValue(value);
            return w.ToArray();
        }

        [Test]
        public void IntegersUseTheirSmallestForm()
        {
            var cases = new Dictionary<long, string>
            {
                { 0, "00" }, { 127, "7F" }, { 128, "CC-80" }, { 255, "CC-FF" }, { 256, "CD-01-00" },
                { 65535, "CD-FF-FF" }, { 65536, "CE-00-01-00-00" }, { 4294967296L, "CF-00-00-00-01-00-00-00-00" },
                { -1, "FF" }, { -32, "E0" }, { -33, "D0-DF" }, { -128, "D0-80" }, { -129, "D1-FF-7F" },
                { -32768, "D1-80-00" }, { -32769, "D2-FF-FF-7F-FF" }, { int.MinValue - 1L, "D3-FF-FF-FF-FF-7F-FF-FF-FF" },
            };
            foreach (var c in cases)
            {
                byte[] bytes = Pack(c.Key);
                Assert.AreEqual(c.Value, BitConverter.ToString(bytes), "encoding of " + c.Key);
                Assert.AreEqual(c.Key, new MsgPackReader(bytes).ReadInt64(), "round trip of " + c.Key);
            }
            Assert.AreEqual(long.MaxValue, new MsgPackReader(Pack(long.MaxValue)).ReadInt64());
            Assert.AreEqual(long.MinValue, new MsgPackReader(Pack(long.MinValue)).ReadInt64());
        }

        [Test]
        public void StringsBinariesAndContainersUseTheirSmallestHeader()
        {
            Assert.AreEqual(0xbf, Pack(new string('a', 31))[0]);
            Assert.AreEqual("D9-20", BitConverter.ToString(Pack(new string('a', 32)), 0, 2));
            Assert.AreEqual("DA-01-00", BitConverter.ToString(Pack(new string('a', 256)), 0, 3));
            Assert.AreEqual("DB-00-01-00-00", BitConverter.ToString(Pack(new string('a', 65536)), 0, 5));
            Assert.AreEqual("C4-00", BitConverter.ToString(Pack(new byte[0])));
            Assert.AreEqual("C5-01-00", BitConverter.ToString(Pack(new byte[256]), 0, 3));
            Assert.AreEqual(0x9f, Pack(new List<object>(new object[15]))[0]);
            Assert.AreEqual("DC-00-10", BitConverter.ToString(Pack(new List<object>(new object[16])), 0, 3));
            var map = new Dictionary<string, object>();
            for (int i = 0; i < 16; i++) map["k" + i] = (long)i;
            Assert.AreEqual("DE-00-10", BitConverter.ToString(Pack(map), 0, 3));
            // Multi-byte UTF-8: the header counts bytes, not characters.
            byte[] sword = Pack("\u2694");
            Assert.AreEqual("A3-E2-9A-94", BitConverter.ToString(sword));
            Assert.AreEqual("\u2694", new MsgPackReader(sword).ReadString());
        }

        [Test]
        public void MapsWrittenBeforeTheirCountIsKnownUseTheSmallestHeader()
        {
            // A message counts its present fields while writing them: BeginMap/EndMap must still give
            // what WriteValue gives for the same map, at 15, 16 and 65536 entries.
            foreach (int size in new[] { 0, 15, 16, 65536 })
            {
                var map = new Dictionary<string, object>();
                for (int i = 0; i < size; i++) map["k" + i] = (long)i;
                var w = new MsgPackWriter(1);
                w.WriteString("before");
                int at = w.BeginMap();
                foreach (var pair in map) { w.WriteString(pair.Key); w.WriteValue(pair.Value); }
                w.EndMap(at, map.Count);
                w.WriteString("after");
                var expected = new MsgPackWriter(1);
                expected.WriteString("before");
                expected.WriteValue(map);
                expected.WriteString("after");
                CollectionAssert.AreEqual(expected.ToArray(), w.ToArray(), size + " entries");
            }
        }

        [Test]
        public void FloatsAreAlwaysFloat64AndIntsReadAsDoubles()
        {
            Assert.AreEqual("CB-3F-F0-00-00-00-00-00-00", BitConverter.ToString(Pack(1.0)));
            Assert.AreEqual("CB-3F-F8-00-00-00-00-00-00", BitConverter.ToString(Pack(1.5f)));
            // A peer may send a whole number as an int or a float32: typed reads accept both.
            Assert.AreEqual(3.0, new MsgPackReader(Pack(3L)).ReadDouble());
            Assert.AreEqual(0.5, new MsgPackReader(new byte[] { 0xca, 0x3f, 0x00, 0x00, 0x00 }).ReadDouble());
        }

        [Test]
        public void SkipStepsOverNestedValues()
        {
            var nested = new Dictionary<string, object>
            {
                { "a", new List<object> { 1L, new Dictionary<string, object> { { "b", new byte[300] } }, "x", 2.5, null, true } },
                { "c", new string('z', 40) },
            };
            byte[] bytes = Pack(new List<object> { nested, 42L });
            var r = new MsgPackReader(bytes);
            Assert.AreEqual(2, r.ReadArrayHeader());
            r.Skip();
            Assert.AreEqual(42L, r.ReadInt64());
            Assert.IsTrue(r.AtEnd);
        }

        [Test]
        public void BadFramesAreRefusedWithProtocolCodes()
        {
            var truncated = Protocol.Encode(new Ping { Id = "p-1" });
            Array.Resize(ref truncated, truncated.Length - 1);
            Assert.AreEqual(ErrorCodes.BadFrame, CodeOf(truncated));
            Assert.AreEqual(ErrorCodes.BadFrame, CodeOf(Pack(new List<object> { 1L })));
            Assert.AreEqual(ErrorCodes.BadFrame, CodeOf(new byte[] { 0xc1 }));
            Assert.AreEqual(ErrorCodes.BadMessage, CodeOf(Pack(new Dictionary<string, object> { { "id", "x" } })));
            Assert.AreEqual(ErrorCodes.BadMessage, CodeOf(Pack(new Dictionary<string, object> { { "type", "teleport" } })));
            Assert.AreEqual(ErrorCodes.BadMessage, CodeOf(Pack(new Dictionary<string, object> { { "type", "chunk" }, { "index", "zero" } })));
        }

        static string CodeOf(byte[] frame)
        {
            try
            {
                Protocol.Decode(frame);
            }
            catch (LoraloomException e)
            {
                return e.Code;
            }
            return "<decoded without error>";
        }

        [Test]
        public void AdapterSpecsParseLikeThePythonClient()
        {
            var plain = AdapterRef.Parse("pirate");
            Assert.AreEqual("pirate", plain.Name);
            Assert.AreEqual(1.0, plain.Scale);
            var scaled = AdapterRef.Parse("elf.v2:0.25");
            Assert.AreEqual("elf.v2", scaled.Name);
            Assert.AreEqual(0.25, scaled.Scale);
            Assert.AreEqual("odd:name", AdapterRef.Parse("odd:name").Name);
        }
    }
}
