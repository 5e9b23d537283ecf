using System;
using System.Collections.Generic;

namespace Loraloom.Core
{
    /// <summary>A protocol value that writes itself as one msgpack map.</summary>
    public interface IMsgPackable
    {
        void WriteTo(MsgPackWriter writer);
    }

    /// <summary>
    /// What the generated message classes (Messages.g.cs, Parts.g.cs) read and write with. The Field
    /// helpers return how many map entries they wrote (0 for a null value), so a message counts its
    /// entries while writing them: "absent values left out". Lists and maps are written and read
    /// item by item through a delegate, which composes for any nesting without reflection.
    /// </summary>
    static class Wire
    {
        // ------------------------------------------------------------ one field of a map

        public static int Field(MsgPackWriter w, string key, string value)
        {
            if (value == null) return 0;
            w.WriteString(key);
            w.WriteString(value);
            return 1;
        }

        public static int Field(MsgPackWriter w, string key, long value)
        {
            w.WriteString(key);
            w.WriteInt(value);
            return 1;
        }

        public static int Field(MsgPackWriter w, string key, long? value)
        {
            return value.HasValue ? Field(w, key, value.Value) : 0;
        }

        public static int Field(MsgPackWriter w, string key, double value)
        {
            w.WriteString(key);
            w.WriteDouble(value);
            return 1;
        }

        public static int Field(MsgPackWriter w, string key, double? value)
        {
            return value.HasValue ? Field(w, key, value.Value) : 0;
        }

        public static int Field(MsgPackWriter w, string key, bool value)
        {
            w.WriteString(key);
            w.WriteBool(value);
            return 1;
        }

        public static int Field(MsgPackWriter w, string key, bool? value)
        {
            return value.HasValue ? Field(w, key, value.Value) : 0;
        }

        public static int Field(MsgPackWriter w, string key, byte[] value)
        {
            if (value == null) return 0;
            w.WriteString(key);
            w.WriteBin(value);
            return 1;
        }

        public static int Field(MsgPackWriter w, string key, IMsgPackable value)
        {
            if (value == null) return 0;
            w.WriteString(key);
            value.WriteTo(w);
            return 1;
        }

        /// <summary>A list, a map or an arbitrary value, written by <paramref name="write"/>.</summary>
        public static int Field<T>(MsgPackWriter w, string key, T value, Action<MsgPackWriter, T> write) where T : class
        {
            if (value == null) return 0;
            w.WriteString(key);
            write(w, value);
            return 1;
        }

        // ------------------------------------------------------------ one value (null: nil)

        public static void Write(MsgPackWriter w, string value) { w.WriteString(value); }

        public static void Write(MsgPackWriter w, long value) { w.WriteInt(value); }

        public static void Write(MsgPackWriter w, long? value)
        {
            if (value.HasValue) w.WriteInt(value.Value);
            else w.WriteNil();
        }

        public static void Write(MsgPackWriter w, double value) { w.WriteDouble(value); }

        public static void Write(MsgPackWriter w, double? value)
        {
            if (value.HasValue) w.WriteDouble(value.Value);
            else w.WriteNil();
        }

        public static void Write(MsgPackWriter w, bool value) { w.WriteBool(value); }

        public static void Write(MsgPackWriter w, bool? value)
        {
            if (value.HasValue) w.WriteBool(value.Value);
            else w.WriteNil();
        }

        public static void Write(MsgPackWriter w, byte[] value) { w.WriteBin(value); }

        public static void Write(MsgPackWriter w, IMsgPackable value)
        {
            if (value == null) w.WriteNil();
            else value.WriteTo(w);
        }

        public static void WriteList<T>(MsgPackWriter w, List<T> list, Action<MsgPackWriter, T> writeItem)
        {
            if (list == null) { w.WriteNil(); return; }
            w.WriteArrayHeader(list.Count);
            foreach (var item in list) writeItem(w, item);
        }

        /// <summary>A string-keyed map, in the dictionary's enumeration (insertion) order.</summary>
        public static void WriteDict<T>(MsgPackWriter w, Dictionary<string, T> map, Action<MsgPackWriter, T> writeValue)
        {
            if (map == null) { w.WriteNil(); return; }
            w.WriteMapHeader(map.Count);
            foreach (var pair in map)
            {
                w.WriteString(pair.Key);
                writeValue(w, pair.Value);
            }
        }

        // ------------------------------------------------------------ reading

        public static int? NullableInt(MsgPackReader r) { return r.TryReadNil() ? (int?)null : r.ReadInt32(); }

        public static long? NullableLong(MsgPackReader r) { return r.TryReadNil() ? (long?)null : r.ReadInt64(); }

        public static double? NullableDouble(MsgPackReader r) { return r.TryReadNil() ? (double?)null : r.ReadDouble(); }

        public static bool? NullableBool(MsgPackReader r) { return r.TryReadNil() ? (bool?)null : r.ReadBool(); }

        public static List<T> ReadList<T>(MsgPackReader r, Func<MsgPackReader, T> readItem)
        {
            int count = r.ReadArrayHeader();
            // Every item takes at least a byte, so a hostile count cannot allocate more than the frame.
            var list = new List<T>(Math.Min(count, 1024));
            for (int i = 0; i < count; i++) list.Add(readItem(r));
            return list;
        }

        public static Dictionary<string, T> ReadDict<T>(MsgPackReader r, Func<MsgPackReader, T> readValue)
        {
            int count = r.ReadMapHeader();
            var map = new Dictionary<string, T>(Math.Min(count, 1024));
            for (int i = 0; i < count; i++)
            {
                string key = r.ReadString();
                map[key] = readValue(r);
            }
            return map;
        }

        /// <summary>
        /// Reads a map into <paramref name="target"/> key by key; keys it does not know (from a newer
        /// daemon) are skipped rather than refused, so an older client keeps working.
        /// </summary>
        public static T Read<T>(MsgPackReader r, T target) where T : WireMap
        {
            int count = r.ReadMapHeader();
            for (int i = 0; i < count; i++)
            {
                string key = r.ReadString();
                if (!target.ReadField(key, r)) r.Skip();
            }
            return target;
        }
    }

    /// <summary>A protocol value encoded as one msgpack map: every message and every part of one.</summary>
    public abstract class WireMap : IMsgPackable
    {
        public void WriteTo(MsgPackWriter writer)
        {
            // The number of present fields is known only once they are written: the header is
            // reserved first and filled in afterwards, in its smallest (canonical) form.
            int at = writer.BeginMap();
            writer.EndMap(at, WriteFields(writer));
        }

        /// <summary>Writes the present fields in protocol order and returns how many it wrote.</summary>
        internal abstract int WriteFields(MsgPackWriter w);

        /// <summary>Reads the value of <paramref name="key"/>; false when the key is not a field.</summary>
        internal abstract bool ReadField(string key, MsgPackReader r);
    }
}
