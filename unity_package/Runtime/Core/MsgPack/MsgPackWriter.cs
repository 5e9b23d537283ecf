using System;
using System.Collections;
using System.Collections.Generic;
using System.Text;

namespace Loraloom.Core
{
    /// <summary>
    /// Writes msgpack in the protocol's canonical form: integers in their smallest form, floats as
    /// float64, strings as UTF-8 str, bytes as bin. One writer is reused frame after frame.
    /// </summary>
    public sealed class MsgPackWriter
    {
        static readonly UTF8Encoding Utf8 = new UTF8Encoding(false, true);

        byte[] _buffer;
        int _length;

        public MsgPackWriter(int capacity = 256)
        {
            _buffer = new byte[Math.Max(16, capacity)];
        }

        public int Length { get { return _length; } }

        public void Clear() { _length = 0; }

        public byte[] ToArray()
        {
            var copy = new byte[_length];
            Buffer.BlockCopy(_buffer, 0, copy, 0, _length);
            return copy;
        }

        /// <summary>The written bytes without a copy; valid until the next write or Clear.</summary>
        public ArraySegment<byte> AsSegment() { return new ArraySegment<byte>(_buffer, 0, _length); }

        public void WriteNil() { Reserve(1); _buffer[_length++] = 0xc0; }

        public void WriteBool(bool value) { Reserve(1); _buffer[_length++] = value ? (byte)0xc3 : (byte)0xc2; }

        public void WriteInt(long value)
        {
            if (value >= 0) { WriteUInt((ulong)value); return; }
            Reserve(9);
            if (value >= -32) _buffer[_length++] = unchecked((byte)(sbyte)value);
            else if (value >= sbyte.MinValue) { _buffer[_length++] = 0xd0; _buffer[_length++] = unchecked((byte)(sbyte)value); }
            else if (value >= short.MinValue) { _buffer[_length++] = 0xd1; PutBigEndian((ulong)value, 2); }
            else if (value >= int.MinValue) { _buffer[_length++] = 0xd2; PutBigEndian((ulong)value, 4); }
            else { _buffer[_length++] = 0xd3; PutBigEndian((ulong)value, 8); }
        }

        public void WriteUInt(ulong value)
        {
            Reserve(9);
            if (value <= 0x7f) _buffer[_length++] = (byte)value;
            else if (value <= byte.MaxValue) { _buffer[_length++] = 0xcc; _buffer[_length++] = (byte)value; }
            else if (value <= ushort.MaxValue) { _buffer[_length++] = 0xcd; PutBigEndian(value, 2); }
            else if (value <= uint.MaxValue) { _buffer[_length++] = 0xce; PutBigEndian(value, 4); }
            else { _buffer[_length++] = 0xcf; PutBigEndian(value, 8); }
        }

        /// <summary>Always float64: the protocol never uses float32, so decoders round-trip exactly.</summary>
        public void WriteDouble(double value)
        {
            Reserve(9);
            _buffer[_length++] = 0xcb;
            PutBigEndian(unchecked((ulong)BitConverter.DoubleToInt64Bits(value)), 8);
        }

        public void WriteString(string value)
        {
            if (value == null) { WriteNil(); return; }
            int size = Utf8.GetByteCount(value);
            Reserve(5 + size);
            if (size <= 31) _buffer[_length++] = (byte)(0xa0 | size);
            else if (size <= byte.MaxValue) { _buffer[_length++] = 0xd9; _buffer[_length++] = (byte)size; }
            else if (size <= ushort.MaxValue) { _buffer[_length++] = 0xda; PutBigEndian((ulong)size, 2); }
            else { _buffer[_length++] = 0xdb; PutBigEndian((ulong)size, 4); }
            _length += Utf8.GetBytes(value, 0, value.Length, _buffer, _length);
        }

        public void WriteBin(byte[] value)
        {
            if (value == null) { WriteNil(); return; }
            int size = value.Length;
            Reserve(5 + size);
            if (size <= byte.MaxValue) { _buffer[_length++] = 0xc4; _buffer[_length++] = (byte)size; }
            else if (size <= ushort.MaxValue) { _buffer[_length++] = 0xc5; PutBigEndian((ulong)size, 2); }
            else { _buffer[_length++] = 0xc6; PutBigEndian((ulong)size, 4); }
            Buffer.BlockCopy(value, 0, _buffer, _length, size);
            _length += size;
        }

        public void WriteArrayHeader(int count)
        {
            Reserve(5);
            if (count <= 15) _buffer[_length++] = (byte)(0x90 | count);
            else if (count <= ushort.MaxValue) { _buffer[_length++] = 0xdc; PutBigEndian((ulong)count, 2); }
            else { _buffer[_length++] = 0xdd; PutBigEndian((ulong)count, 4); }
        }

        public void WriteMapHeader(int count)
        {
            Reserve(5);
            if (count <= 15) _buffer[_length++] = (byte)(0x80 | count);
            else if (count <= ushort.MaxValue) { _buffer[_length++] = 0xde; PutBigEndian((ulong)count, 2); }
            else { _buffer[_length++] = 0xdf; PutBigEndian((ulong)count, 4); }
        }

        /// <summary>
        /// Reserves the header of a map whose entries are written next; <see cref="EndMap"/> fills it
        /// in once their number is known.
        /// </summary>
        public int BeginMap()
        {
            Reserve(1);
            _buffer[_length] = 0x80;
            return _length++;
        }

        /// <summary>
        /// Fills in the header reserved by <see cref="BeginMap"/> with <paramref name="count"/>
        /// entries, in the smallest form: a fixmap up to 15, else map16 or map32 (the entries move up
        /// to make room, which only maps of more than 15 fields pay for).
        /// </summary>
        public void EndMap(int headerPosition, int count)
        {
            if (count < 0 || headerPosition < 0 || headerPosition >= _length)
                throw new InvalidOperationException("EndMap without a matching BeginMap");
            if (count <= 15)
            {
                _buffer[headerPosition] = (byte)(0x80 | count);
                return;
            }
            int extra = count <= ushort.MaxValue ? 2 : 4;
            Reserve(extra);
            int body = headerPosition + 1;
            Array.Copy(_buffer, body, _buffer, body + extra, _length - body);
            _length += extra;
            _buffer[headerPosition] = extra == 2 ? (byte)0xde : (byte)0xdf;
            for (int i = 0; i < extra; i++)
                _buffer[body + i] = (byte)((uint)count >> (8 * (extra - 1 - i)));
        }

        /// <summary>
        /// Writes a plain value tree: null, bool, integers, float/double, string, byte[], lists and
        /// string-keyed dictionaries (in their enumeration order). Used for tests and tooling; messages
        /// write themselves field by field.
        /// </summary>
        public void WriteValue(object value)
        {
            if (value == null) { WriteNil(); return; }
            var s = value as string;
            if (s != null) { WriteString(s); return; }
            var bin = value as byte[];
            if (bin != null) { WriteBin(bin); return; }
            if (value is bool) { WriteBool((bool)value); return; }
            if (value is double) { WriteDouble((double)value); return; }
            if (value is float) { WriteDouble((float)value); return; }
            if (value is ulong) { WriteUInt((ulong)value); return; }
            if (value is long || value is int || value is short || value is sbyte
                || value is uint || value is ushort || value is byte)
            {
                WriteInt(Convert.ToInt64(value));
                return;
            }
            var map = value as IDictionary;
            if (map != null)
            {
                WriteMapHeader(map.Count);
                foreach (DictionaryEntry entry in map)
                {
                    WriteString((string)entry.Key);
                    WriteValue(entry.Value);
                }
                return;
            }
            var pairs = value as IEnumerable<KeyValuePair<string, object>>;
            if (pairs != null)
            {
                var list = new List<KeyValuePair<string, object>>(pairs);
                WriteMapHeader(list.Count);
                foreach (var pair in list) { WriteString(pair.Key); WriteValue(pair.Value); }
                return;
            }
            var items = value as IList;
            if (items != null)
            {
                WriteArrayHeader(items.Count);
                foreach (var item in items) WriteValue(item);
                return;
            }
            throw new ArgumentException("cannot write a value of type " + value.GetType().Name + " as msgpack");
        }

        void PutBigEndian(ulong value, int bytes)
        {
            for (int shift = (bytes - 1) * 8; shift >= 0; shift -= 8)
                _buffer[_length++] = (byte)(value >> shift);
        }

        void Reserve(int extra)
        {
            int needed = _length + extra;
            if (needed <= _buffer.Length) return;
            int size = _buffer.Length * 2;
            while (size < needed) size *= 2;
            Array.Resize(ref _buffer, size);
        }
    }
}
