using System;
using System.Collections.Generic;
using System.Text;

namespace Loraloom.Core
{
    /// <summary>A frame that is not valid msgpack, or a value of the wrong kind for its field.</summary>
    public sealed class MsgPackException : FormatException
    {
        public MsgPackException(string message) : base(message) { }
    }

    /// <summary>The kind of the next msgpack value, as far as the protocol cares.</summary>
    public enum MsgPackKind { Nil, Bool, Int, Float, String, Binary, Array, Map, Extension }

    /// <summary>
    /// Reads msgpack from a byte range without copying it. Typed reads accept every wire form of
    /// their kind (a peer may send 1 for 1.0, or int32 for a small int), so only the writer is
    /// strict about canonical forms.
    /// </summary>
    public sealed class MsgPackReader
    {
        static readonly UTF8Encoding Utf8 = new UTF8Encoding(false, true);

        readonly byte[] _buffer;
        readonly int _start;
        readonly int _end;
        int _position;

        public MsgPackReader(byte[] buffer) : this(buffer, 0, buffer == null ? 0 : buffer.Length) { }

        public MsgPackReader(byte[] buffer, int offset, int count)
        {
            if (buffer == null) throw new ArgumentNullException("buffer");
            if (offset < 0 || count < 0 || offset + count > buffer.Length) throw new ArgumentOutOfRangeException("count");
            _buffer = buffer;
            _start = offset;
            _position = offset;
            _end = offset + count;
        }

        /// <summary>Position relative to the start of the range; settable to re-read a value.</summary>
        public int Position
        {
            get { return _position - _start; }
            set
            {
                if (value < 0 || _start + value > _end) throw new ArgumentOutOfRangeException("value");
                _position = _start + value;
            }
        }

        public bool AtEnd { get { return _position >= _end; } }

        public MsgPackKind PeekKind()
        {
            byte b = Peek();
            if (b <= 0x7f || b >= 0xe0) return MsgPackKind.Int;
            if (b <= 0x8f) return MsgPackKind.Map;
            if (b <= 0x9f) return MsgPackKind.Array;
            if (b <= 0xbf) return MsgPackKind.String;
            switch (b)
            {
                case 0xc0: return MsgPackKind.Nil;
                case 0xc2: case 0xc3: return MsgPackKind.Bool;
                case 0xc4: case 0xc5: case 0xc6: return MsgPackKind.Binary;
                case 0xca: case 0xcb: return MsgPackKind.Float;
                case 0xcc: case 0xcd: case 0xce: case 0xcf:
                case 0xd0: case 0xd1: case 0xd2: case 0xd3: return MsgPackKind.Int;
                case 0xd9: case 0xda: case 0xdb: return MsgPackKind.String;
                case 0xdc: case 0xdd: return MsgPackKind.Array;
                case 0xde: case 0xdf: return MsgPackKind.Map;
                case 0xc7: case 0xc8: case 0xc9:
                case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: return MsgPackKind.Extension;
                default: throw new MsgPackException("invalid msgpack byte 0x" + b.ToString("x2") + " at " + Position);
            }
        }

        /// <summary>Consumes a nil and returns true, or leaves anything else in place.</summary>
        public bool TryReadNil()
        {
            if (Peek() != 0xc0) return false;
            _position++;
            return true;
        }

        public bool ReadBool()
        {
            byte b = Take();
            if (b == 0xc3) return true;
            if (b == 0xc2) return false;
            throw Mismatch("bool", b);
        }

        public long ReadInt64()
        {
            byte b = Take();
            if (b <= 0x7f) return b;
            if (b >= 0xe0) return unchecked((sbyte)b);
            switch (b)
            {
                case 0xcc: return Take();
                case 0xcd: return (long)TakeBigEndian(2);
                case 0xce: return (long)TakeBigEndian(4);
                case 0xcf:
                    ulong u = TakeBigEndian(8);
                    if (u > long.MaxValue) throw new MsgPackException("integer " + u + " does not fit in int64");
                    return (long)u;
                case 0xd0: return unchecked((sbyte)Take());
                case 0xd1: return unchecked((short)TakeBigEndian(2));
                case 0xd2: return unchecked((int)TakeBigEndian(4));
                case 0xd3: return unchecked((long)TakeBigEndian(8));
                default: throw Mismatch("integer", b);
            }
        }

        public int ReadInt32()
        {
            long value = ReadInt64();
            if (value < int.MinValue || value > int.MaxValue) throw new MsgPackException("integer " + value + " does not fit in int32");
            return (int)value;
        }

        /// <summary>A float of either width, or an integer (which a peer may send for a whole number).</summary>
        public double ReadDouble()
        {
            byte b = Peek();
            if (b == 0xcb) { _position++; return BitConverter.Int64BitsToDouble(unchecked((long)TakeBigEndian(8))); }
            if (b == 0xca)
            {
                _position++;
                var bytes = BitConverter.GetBytes(unchecked((uint)TakeBigEndian(4)));
                return BitConverter.ToSingle(bytes, 0);
            }
            if (b == 0xcf) { _position++; return TakeBigEndian(8); }
            return ReadInt64();
        }

        public string ReadString()
        {
            byte b = Take();
            int size;
            if (b >= 0xa0 && b <= 0xbf) size = b & 0x1f;
            else if (b == 0xd9) size = Take();
            else if (b == 0xda) size = (int)TakeBigEndian(2);
            else if (b == 0xdb) size = Length(TakeBigEndian(4));
            else throw Mismatch("string", b);
            Require(size);
            string value;
            try { value = Utf8.GetString(_buffer, _position, size); }
            catch (ArgumentException) { throw new MsgPackException("string at " + Position + " is not valid UTF-8"); }
            _position += size;
            return value;
        }

        public string ReadStringOrNull() { return TryReadNil() ? null : ReadString(); }

        public byte[] ReadBinary()
        {
            byte b = Take();
            int size;
            if (b == 0xc4) size = Take();
            else if (b == 0xc5) size = (int)TakeBigEndian(2);
            else if (b == 0xc6) size = Length(TakeBigEndian(4));
            else throw Mismatch("binary", b);
            Require(size);
            var value = new byte[size];
            Buffer.BlockCopy(_buffer, _position, value, 0, size);
            _position += size;
            return value;
        }

        public int ReadArrayHeader()
        {
            byte b = Take();
            if (b >= 0x90 && b <= 0x9f) return b & 0x0f;
            if (b == 0xdc) return (int)TakeBigEndian(2);
            if (b == 0xdd) return Length(TakeBigEndian(4));
            throw Mismatch("array", b);
        }

        public int ReadMapHeader()
        {
            byte b = Take();
            if (b >= 0x80 && b <= 0x8f) return b & 0x0f;
            if (b == 0xde) return (int)TakeBigEndian(2);
            if (b == 0xdf) return Length(TakeBigEndian(4));
            throw Mismatch("map", b);
        }

        /// <summary>Steps over one whole value, however deeply nested, without allocating.</summary>
        public void Skip()
        {
            long pending = 1;
            while (pending > 0)
            {
                pending--;
                byte b = Take();
                if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) continue;
                if (b <= 0x8f) { pending += 2 * (b & 0x0f); continue; }
                if (b <= 0x9f) { pending += b & 0x0f; continue; }
                if (b <= 0xbf) { Advance(b & 0x1f); continue; }
                switch (b)
                {
                    case 0xc4: case 0xd9: Advance(Take()); break;
                    case 0xc5: case 0xda: Advance((int)TakeBigEndian(2)); break;
                    case 0xc6: case 0xdb: Advance(Length(TakeBigEndian(4))); break;
                    case 0xc7: { int n = Take(); Advance(1 + n); break; }
                    case 0xc8: { int n = (int)TakeBigEndian(2); Advance(1 + n); break; }
                    case 0xc9: { int n = Length(TakeBigEndian(4)); Advance(1 + n); break; }
                    case 0xca: Advance(4); break;
                    case 0xcb: Advance(8); break;
                    case 0xcc: case 0xd0: Advance(1); break;
                    case 0xcd: case 0xd1: Advance(2); break;
                    case 0xce: case 0xd2: Advance(4); break;
                    case 0xcf: case 0xd3: Advance(8); break;
                    case 0xd4: Advance(2); break;
                    case 0xd5: Advance(3); break;
                    case 0xd6: Advance(5); break;
                    case 0xd7: Advance(9); break;
                    case 0xd8: Advance(17); break;
                    case 0xdc: pending += (int)TakeBigEndian(2); break;
                    case 0xdd: pending += Length(TakeBigEndian(4)); break;
                    case 0xde: pending += 2 * (int)TakeBigEndian(2); break;
                    case 0xdf: pending += 2 * Length(TakeBigEndian(4)); break;
                    default: throw new MsgPackException("invalid msgpack byte 0x" + b.ToString("x2"));
                }
            }
        }

        /// <summary>
        /// Reads one value as a plain tree: null, bool, long (ulong above long.MaxValue), double,
        /// string, byte[], List&lt;object&gt; and Dictionary&lt;string, object&gt; (in wire order).
        /// </summary>
        public object ReadValue()
        {
            switch (PeekKind())
            {
                case MsgPackKind.Nil: _position++; return null;
                case MsgPackKind.Bool: return ReadBool();
                case MsgPackKind.Float: return ReadDouble();
                case MsgPackKind.String: return ReadString();
                case MsgPackKind.Binary: return ReadBinary();
                case MsgPackKind.Int:
                    if (Peek() == 0xcf)
                    {
                        _position++;
                        ulong u = TakeBigEndian(8);
                        if (u > long.MaxValue) return u;
                        return (long)u;
                    }
                    return ReadInt64();
                case MsgPackKind.Array:
                {
                    int count = ReadArrayHeader();
                    var list = new List<object>(Math.Min(count, 1024));
                    for (int i = 0; i < count; i++) list.Add(ReadValue());
                    return list;
                }
                case MsgPackKind.Map:
                {
                    int count = ReadMapHeader();
                    var map = new Dictionary<string, object>(Math.Min(count, 1024));
                    for (int i = 0; i < count; i++)
                    {
                        if (PeekKind() != MsgPackKind.String) throw new MsgPackException("map key at " + Position + " is not a string");
                        string key = ReadString();
                        if (map.ContainsKey(key)) throw new MsgPackException("duplicate map key '" + key + "'");
                        map.Add(key, ReadValue());
                    }
                    return map;
                }
                default:
                    throw new MsgPackException("msgpack extension types are not used by the protocol");
            }
        }

        byte Peek()
        {
            if (_position >= _end) throw new MsgPackException("frame ends in the middle of a value");
            return _buffer[_position];
        }

        byte Take()
        {
            if (_position >= _end) throw new MsgPackException("frame ends in the middle of a value");
            return _buffer[_position++];
        }

        ulong TakeBigEndian(int bytes)
        {
            Require(bytes);
            ulong value = 0;
            for (int i = 0; i < bytes; i++) value = (value << 8) | _buffer[_position++];
            return value;
        }

        void Require(int bytes)
        {
            if (bytes < 0 || _end - _position < bytes) throw new MsgPackException("frame ends in the middle of a value");
        }

        void Advance(int bytes)
        {
            Require(bytes);
            _position += bytes;
        }

        static int Length(ulong size)
        {
            // A length beyond int.MaxValue cannot be in a byte[] frame: refuse it before it overflows.
            if (size > int.MaxValue) throw new MsgPackException("length " + size + " is larger than any frame");
            return (int)size;
        }

        MsgPackException Mismatch(string expected, byte b)
        {
            return new MsgPackException("expected " + expected + " at " + (Position - 1) + ", found byte 0x" + b.ToString("x2"));
        }
    }
}
