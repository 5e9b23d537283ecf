// Decodes frames into the generated classes and encodes them again, for tests/unity/test_generated.py.
// Usage: mono RoundTrip.exe DIR; DIR holds KIND.NAME.in (a frame, in any field order, defaults
// possibly left out, unknown fields possibly added) and KIND.NAME.out (its canonical bytes). KIND is
// "real" (Loraloom.Core) or "sample" (the classes generated from tests/bridge/protocol_samples.py).
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;

namespace Loraloom.Core.Sample
{
    static class RoundTrip
    {
        static int Main(string[] args)
        {
            int failures = 0;
            foreach (string input in Directory.GetFiles(args[0], "*.in").OrderBy(p => p, StringComparer.Ordinal))
            {
                string name = Path.GetFileNameWithoutExtension(input);
                byte[] frame = File.ReadAllBytes(input);
                byte[] expected = File.ReadAllBytes(Path.ChangeExtension(input, ".out"));
                byte[] actual;
                try
                {
                    actual = name.StartsWith("real.") ? global::Loraloom.Core.Protocol.Encode(global::Loraloom.Core.Protocol.Decode(frame))
                        : global::Loraloom.Core.Protocol.Encode(DecodeSample(frame));
                }
                catch (Exception e)
                {
                    Console.WriteLine("FAIL " + name + ": " + e.GetType().Name + ": " + e.Message);
                    failures++;
                    continue;
                }
                if (actual.SequenceEqual(expected)) Console.WriteLine("ok " + name);
                else
                {
                    Console.WriteLine("FAIL " + name + ": " + BitConverter.ToString(actual) + " expected " + BitConverter.ToString(expected));
                    failures++;
                }
            }
            return failures == 0 ? 0 : 1;
        }

        static ProtocolMessage DecodeSample(byte[] frame)
        {
            var map = (Dictionary<string, object>)new MsgPackReader(frame).ReadValue();
            ProtocolMessage message = Protocol.Create((string)map["type"]);
            if (message == null) throw new InvalidOperationException("no sample message " + map["type"]);
            return Wire.Read(new MsgPackReader(frame), message);
        }
    }
}
