using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace Loraloom.Core
{
    /// <summary>
    /// A small JSON reader for the runtime file (Unity's JsonUtility cannot read into dictionaries
    /// and Core references no engine). Objects become Dictionary&lt;string, object&gt; in file order,
    /// arrays List&lt;object&gt;; a number without fraction or exponent is a long, others a double.
    /// </summary>
    static class Json
    {
        public static object Parse(string text)
        {
            var parser = new Parser(text);
            parser.SkipSpace();
            object value = parser.Value(0);
            parser.SkipSpace();
            if (!parser.AtEnd) throw parser.Fail("text after the value");
            return value;
        }

        /// <summary>
        /// <paramref name="value"/> (a tree as <see cref="Parse"/> or the msgpack reader give) as compact
        /// JSON, map keys in their order.
        /// </summary>
        public static string Write(object value)
        {
            var sb = new StringBuilder();
            Write(sb, value, 0);
            return sb.ToString();
        }

        static void Write(StringBuilder sb, object value, int depth)
        {
            if (depth > 64) throw new ArgumentException("nested too deeply for JSON");
            if (value == null) { sb.Append("null"); return; }
            var text = value as string;
            if (text != null) { sb.Append(Quote(text)); return; }
            if (value is bool) { sb.Append((bool)value ? "true" : "false"); return; }
            if (value is double || value is float)
            {
                double d = Convert.ToDouble(value, CultureInfo.InvariantCulture);
                if (double.IsNaN(d) || double.IsInfinity(d)) throw new ArgumentException("JSON has no " + d);
                sb.Append(d.ToString("R", CultureInfo.InvariantCulture));
                return;
            }
            var map = value as System.Collections.IDictionary;
            if (map != null)
            {
                sb.Append('{');
                bool first = true;
                foreach (System.Collections.DictionaryEntry entry in map)
                {
                    if (!first) sb.Append(',');
                    first = false;
                    sb.Append(Quote(Convert.ToString(entry.Key, CultureInfo.InvariantCulture))).Append(':');
                    Write(sb, entry.Value, depth + 1);
                }
                sb.Append('}');
                return;
            }
            var items = value as System.Collections.IList;
            if (items != null)
            {
                sb.Append('[');
                for (int i = 0; i < items.Count; i++)
                {
                    if (i > 0) sb.Append(',');
                    Write(sb, items[i], depth + 1);
                }
                sb.Append(']');
                return;
            }
            if (value is IFormattable && (value.GetType().IsPrimitive || value is decimal))
            {
                sb.Append(((IFormattable)value).ToString(null, CultureInfo.InvariantCulture));
                return;
            }
            throw new ArgumentException("a " + value.GetType().Name + " has no JSON form");
        }

        /// <summary>A JSON string literal for <paramref name="value"/>.</summary>
        public static string Quote(string value)
        {
            var sb = new StringBuilder(value.Length + 2);
            sb.Append('"');
            foreach (char c in value)
            {
                switch (c)
                {
                    case '"': sb.Append("\\\""); break;
                    case '\\': sb.Append("\\\\"); break;
                    case '\n': sb.Append("\\n"); break;
                    case '\r': sb.Append("\\r"); break;
                    case '\t': sb.Append("\\t"); break;
                    default:
                        if (c < 0x20) sb.Append("\\u").Append(((int)c).ToString("x4"));
                        else sb.Append(c);
                        break;
                }
            }
            return sb.Append('"').ToString();
        }

        sealed class Parser
        {
            const int MaxDepth = 64;
            readonly string _text;
            int _pos;

            public Parser(string text) { _text = text; }

            public bool AtEnd { get { return _pos >= _text.Length; } }

            public FormatException Fail(string what)
            {
                return new FormatException("invalid JSON at character " + _pos + ": " + what);
            }

            public void SkipSpace()
            {
                while (_pos < _text.Length && (_text[_pos] == ' ' || _text[_pos] == '\t' || _text[_pos] == '\n' || _text[_pos] == '\r'))
                    _pos++;
            }

            public object Value(int depth)
            {
                if (depth > MaxDepth) throw Fail("nested too deeply");
                if (AtEnd) throw Fail("unexpected end");
                char c = _text[_pos];
                if (c == '{') return Object(depth);
                if (c == '[') return Array(depth);
                if (c == '"') return String();
                if (c == '-' || (c >= '0' && c <= '9')) return Number();
                if (Word("true")) return true;
                if (Word("false")) return false;
                if (Word("null")) return null;
                throw Fail("unexpected character '" + c + "'");
            }

            bool Word(string word)
            {
                if (string.CompareOrdinal(_text, _pos, word, 0, word.Length) != 0) return false;
                _pos += word.Length;
                return true;
            }

            void Expect(char c)
            {
                if (AtEnd || _text[_pos] != c) throw Fail("expected '" + c + "'");
                _pos++;
            }

            Dictionary<string, object> Object(int depth)
            {
                var map = new Dictionary<string, object>();
                Expect('{');
                SkipSpace();
                if (!AtEnd && _text[_pos] == '}') { _pos++; return map; }
                while (true)
                {
                    SkipSpace();
                    string key = String();
                    SkipSpace();
                    Expect(':');
                    SkipSpace();
                    map[key] = Value(depth + 1);
                    SkipSpace();
                    if (!AtEnd && _text[_pos] == ',') { _pos++; continue; }
                    Expect('}');
                    return map;
                }
            }

            List<object> Array(int depth)
            {
                var list = new List<object>();
                Expect('[');
                SkipSpace();
                if (!AtEnd && _text[_pos] == ']') { _pos++; return list; }
                while (true)
                {
                    SkipSpace();
                    list.Add(Value(depth + 1));
                    SkipSpace();
                    if (!AtEnd && _text[_pos] == ',') { _pos++; continue; }
                    Expect(']');
                    return list;
                }
            }

            string String()
            {
                Expect('"');
                var sb = new StringBuilder();
                while (true)
                {
                    if (AtEnd) throw Fail("unterminated string");
                    char c = _text[_pos++];
                    if (c == '"') return sb.ToString();
                    if (c != '\\') { sb.Append(c); continue; }
                    if (AtEnd) throw Fail("unterminated escape");
                    char e = _text[_pos++];
                    switch (e)
                    {
                        case '"': sb.Append('"'); break;
                        case '\\': sb.Append('\\'); break;
                        case '/': sb.Append('/'); break;
                        case 'b': sb.Append('\b'); break;
                        case 'f': sb.Append('\f'); break;
                        case 'n': sb.Append('\n'); break;
                        case 'r': sb.Append('\r'); break;
                        case 't': sb.Append('\t'); break;
                        case 'u':
                            // Surrogate pairs arrive as two escapes; appending both halves rebuilds them.
                            if (_pos + 4 > _text.Length) throw Fail("short \\u escape");
                            int code;
                            if (!int.TryParse(_text.Substring(_pos, 4), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out code))
                                throw Fail("bad \\u escape");
                            sb.Append((char)code);
                            _pos += 4;
                            break;
                        default: throw Fail("bad escape '\\" + e + "'");
                    }
                }
            }

            object Number()
            {
                int start = _pos;
                bool integral = true;
                if (_text[_pos] == '-') _pos++;
                while (_pos < _text.Length)
                {
                    char c = _text[_pos];
                    if (c >= '0' && c <= '9') { _pos++; continue; }
                    if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { integral = false; _pos++; continue; }
                    break;
                }
                string token = _text.Substring(start, _pos - start);
                if (integral)
                {
                    long l;
                    if (long.TryParse(token, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out l)) return l;
                    ulong u;
                    if (ulong.TryParse(token, NumberStyles.None, CultureInfo.InvariantCulture, out u)) return u;
                }
                double d;
                if (!double.TryParse(token, NumberStyles.Float, CultureInfo.InvariantCulture, out d)) throw Fail("bad number '" + token + "'");
                return d;
            }
        }
    }
}
