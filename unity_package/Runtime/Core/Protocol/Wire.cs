using System.Collections.Generic;

namespace Loraloom.Core
{
    /// <summary>A protocol value that writes itself as one msgpack map.</summary>
    public interface IMsgPackable
    {
        void WriteTo(MsgPackWriter writer);
    }

    /// <summary>
    /// Field helpers shared by the message classes. Each returns how many map entries it wrote (0 for
    /// a null value), so a message can count its entries while writing them: "absent values left out".
    /// </summary>
    static class Wire
    {
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

        public static int Field(MsgPackWriter w, string key, IMsgPackable value)
        {
            if (value == null) return 0;
            w.WriteString(key);
            value.WriteTo(w);
            return 1;
        }

        public static int Field<T>(MsgPackWriter w, string key, List<T> value) where T : IMsgPackable
        {
            if (value == null) return 0;
            w.WriteString(key);
            w.WriteArrayHeader(value.Count);
            foreach (var item in value) item.WriteTo(w);
            return 1;
        }

        public static int Field(MsgPackWriter w, string key, List<string> value)
        {
            if (value == null) return 0;
            w.WriteString(key);
            w.WriteArrayHeader(value.Count);
            foreach (var item in value) w.WriteString(item);
            return 1;
        }

        public static int Field(MsgPackWriter w, string key, List<byte[]> value)
        {
            if (value == null) return 0;
            w.WriteString(key);
            w.WriteArrayHeader(value.Count);
            foreach (var item in value) w.WriteBin(item);
            return 1;
        }

        public static int Field(MsgPackWriter w, string key, Dictionary<string, int> value)
        {
            if (value == null) return 0;
            w.WriteString(key);
            w.WriteMapHeader(value.Count);
            foreach (var pair in value)
            {
                w.WriteString(pair.Key);
                w.WriteInt(pair.Value);
            }
            return 1;
        }

        public static int? NullableInt(MsgPackReader r) { return r.TryReadNil() ? (int?)null : r.ReadInt32(); }

        public static long? NullableLong(MsgPackReader r) { return r.TryReadNil() ? (long?)null : r.ReadInt64(); }

        public static double? NullableDouble(MsgPackReader r) { return r.TryReadNil() ? (double?)null : r.ReadDouble(); }

        public static List<string> Strings(MsgPackReader r)
        {
            if (r.TryReadNil()) return null;
            int count = r.ReadArrayHeader();
            var list = new List<string>(count);
            for (int i = 0; i < count; i++) list.Add(r.ReadString());
            return list;
        }

        public static List<byte[]> Binaries(MsgPackReader r)
        {
            if (r.TryReadNil()) return null;
            int count = r.ReadArrayHeader();
            var list = new List<byte[]>(count);
            for (int i = 0; i < count; i++) list.Add(r.ReadBinary());
            return list;
        }

        public static Dictionary<string, int> IntMap(MsgPackReader r)
        {
            if (r.TryReadNil()) return null;
            int count = r.ReadMapHeader();
            var map = new Dictionary<string, int>(count);
            for (int i = 0; i < count; i++)
            {
                string key = r.ReadString();
                map[key] = r.ReadInt32();
            }
            return map;
        }

        public static List<T> Maps<T>(MsgPackReader r) where T : WireMap, new()
        {
            if (r.TryReadNil()) return null;
            int count = r.ReadArrayHeader();
            var list = new List<T>(count);
            for (int i = 0; i < count; i++) list.Add(Read(r, new T()));
            return list;
        }

        public static T MapOrNull<T>(MsgPackReader r) where T : WireMap, new()
        {
            return r.TryReadNil() ? null : Read(r, new T());
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
            // Every protocol map has at most 15 fields, so one header byte is reserved and patched
            // afterwards with the real count; it is still the smallest (canonical) map form.
            int at = writer.BeginSmallMap();
            writer.EndSmallMap(at, WriteFields(writer));
        }

        /// <summary>Writes the present fields in protocol order and returns how many it wrote.</summary>
        internal abstract int WriteFields(MsgPackWriter w);

        /// <summary>Reads the value of <paramref name="key"/>; false when the key is not a field.</summary>
        internal abstract bool ReadField(string key, MsgPackReader r);
    }
}
