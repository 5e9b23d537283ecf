using System;
using System.Collections;
using System.Collections.Generic;
using System.Globalization;
using System.Reflection;

namespace Loraloom.Core
{
    /// <summary>
    /// JSON Schema keywords for one field of a class described by <see cref="JsonSchema.For{T}"/>.
    /// On a list or array field, <see cref="MinItems"/> and <see cref="MaxItems"/> bound the list
    /// and the other keywords apply to its items.
    /// </summary>
    /// <remarks>
    /// Bound what the model writes: a string without <see cref="MaxLength"/> or a number without
    /// <see cref="Maximum"/> may go on until max_tokens, and the answer then comes back incomplete.
    /// </remarks>
    [AttributeUsage(AttributeTargets.Field)]
    public sealed class JsonFieldAttribute : Attribute
    {
        /// <summary>The smallest number allowed (NaN: the type's own bound, if any).</summary>
        public double Minimum = double.NaN;
        /// <summary>The largest number allowed (NaN: the type's own bound, if any).</summary>
        public double Maximum = double.NaN;
        /// <summary>The fewest characters of a string (-1: no bound).</summary>
        public int MinLength = -1;
        /// <summary>The most characters of a string (-1: no bound).</summary>
        public int MaxLength = -1;
        /// <summary>The fewest items of a list or array (-1: no bound).</summary>
        public int MinItems = -1;
        /// <summary>The most items of a list or array (-1: no bound).</summary>
        public int MaxItems = -1;
        /// <summary>A regular expression a string matches (JSON Schema <c>pattern</c>).</summary>
        public string Pattern;
        /// <summary>The only strings allowed.</summary>
        public string[] Enum;
        /// <summary>What the field means, for the model.</summary>
        public string Description;
    }

    /// <summary>
    /// JSON Schemas from C# types, for <c>Generate.JsonSchema</c> and <c>Tool.Parameters</c>: what
    /// <c>JsonMapper.ToObject</c> reads back into the same type.
    /// </summary>
    /// <remarks>
    /// The fields are the ones Unity's JsonUtility serialises: public instance fields that are
    /// neither readonly nor [NonSerialized], in declaration order, every one required, no others
    /// allowed. string, bool, char, the integer types (bounded by their range), float, double,
    /// decimal, enums (by name), arrays, List&lt;T&gt;, Dictionary&lt;string, T&gt;, object (any
    /// value) and nested classes or structs; <see cref="JsonFieldAttribute"/> adds bounds.
    /// </remarks>
    public static class JsonSchema
    {
        const int MaxDepth = 32;

        /// <summary>The schema of <typeparamref name="T"/>.</summary>
        public static Dictionary<string, object> For<T>() { return For(typeof(T)); }

        /// <summary>The schema of <paramref name="type"/>; ArgumentException for a type it cannot describe.</summary>
        public static Dictionary<string, object> For(Type type)
        {
            if (type == null) throw new ArgumentNullException("type");
            return Describe(type, null, 0, type.Name);
        }

        /// <summary>The fields of <paramref name="type"/> that a schema describes and the mapper fills, in declaration order.</summary>
        internal static FieldInfo[] SerializedFields(Type type)
        {
            var fields = new List<FieldInfo>();
            foreach (FieldInfo field in type.GetFields(BindingFlags.Public | BindingFlags.Instance))
            {
                if (field.IsInitOnly || field.IsNotSerialized) continue;
                fields.Add(field);
            }
            fields.Sort((a, b) => a.MetadataToken.CompareTo(b.MetadataToken));
            return fields.ToArray();
        }

        /// <summary>The item type of an array or a List-like type, else null.</summary>
        internal static Type ItemType(Type type)
        {
            if (type.IsArray) return type.GetArrayRank() == 1 ? type.GetElementType() : null;
            if (type.IsGenericType && typeof(IList).IsAssignableFrom(type) && type.GetGenericArguments().Length == 1)
                return type.GetGenericArguments()[0];
            return null;
        }

        /// <summary>The value type of a Dictionary&lt;string, T&gt;-like type, else null.</summary>
        internal static Type DictionaryValueType(Type type)
        {
            if (!type.IsGenericType || !typeof(IDictionary).IsAssignableFrom(type)) return null;
            Type[] args = type.GetGenericArguments();
            return args.Length == 2 && args[0] == typeof(string) ? args[1] : null;
        }

        static Dictionary<string, object> Describe(Type type, JsonFieldAttribute field, int depth, string path)
        {
            if (depth > MaxDepth) throw new ArgumentException(path + ": nested more than " + MaxDepth + " deep (a recursive type?)");
            Type underlying = Nullable.GetUnderlyingType(type);
            if (underlying != null) type = underlying;
            var schema = new Dictionary<string, object>();
            if (type == typeof(object)) return Described(schema, field);
            if (type == typeof(string))
            {
                schema["type"] = "string";
                return Strings(schema, field);
            }
            if (type == typeof(char))
            {
                schema["type"] = "string";
                schema["minLength"] = 1L;
                schema["maxLength"] = 1L;
                return Described(schema, field);
            }
            if (type == typeof(bool))
            {
                schema["type"] = "boolean";
                return Described(schema, field);
            }
            if (type.IsEnum)
            {
                schema["type"] = "string";
                schema["enum"] = new List<object>(System.Enum.GetNames(type));
                return Described(schema, field);
            }
            long low, high;
            if (IntegerRange(type, out low, out high))
            {
                schema["type"] = "integer";
                // long's own limits are left out (any JSON integer the reader takes fits), ulong keeps its 0.
                Bound(schema, "minimum", field != null ? field.Minimum : double.NaN, low, type == typeof(long));
                Bound(schema, "maximum", field != null ? field.Maximum : double.NaN, high, type == typeof(long) || type == typeof(ulong));
                return Described(schema, field);
            }
            if (type == typeof(float) || type == typeof(double) || type == typeof(decimal))
            {
                schema["type"] = "number";
                if (field != null && !double.IsNaN(field.Minimum)) schema["minimum"] = field.Minimum;
                if (field != null && !double.IsNaN(field.Maximum)) schema["maximum"] = field.Maximum;
                return Described(schema, field);
            }
            Type item = ItemType(type);
            if (item != null)
            {
                schema["type"] = "array";
                schema["items"] = Describe(item, ItemKeywords(field), depth + 1, path + "[]");
                if (field != null && field.MinItems >= 0) schema["minItems"] = (long)field.MinItems;
                if (field != null && field.MaxItems >= 0) schema["maxItems"] = (long)field.MaxItems;
                return Described(schema, field);
            }
            if (typeof(IDictionary).IsAssignableFrom(type))
            {
                Type value = DictionaryValueType(type);
                if (value == null) throw new ArgumentException(path + ": only dictionaries with string keys are JSON objects");
                schema["type"] = "object";
                schema["additionalProperties"] = Describe(value, ItemKeywords(field), depth + 1, path + "{}");
                return Described(schema, field);
            }
            if (type.IsPrimitive || type.IsPointer || type.IsInterface || type.IsAbstract || typeof(Delegate).IsAssignableFrom(type))
                throw new ArgumentException(path + ": a " + type.Name + " has no JSON form");
            var properties = new Dictionary<string, object>();
            var required = new List<object>();
            foreach (FieldInfo member in SerializedFields(type))
            {
                var keywords = (JsonFieldAttribute)Attribute.GetCustomAttribute(member, typeof(JsonFieldAttribute));
                properties[member.Name] = Describe(member.FieldType, keywords, depth + 1, path + "." + member.Name);
                required.Add(member.Name);
            }
            schema["type"] = "object";
            schema["properties"] = properties;
            schema["required"] = required;
            schema["additionalProperties"] = false;
            return Described(schema, field);
        }

        static Dictionary<string, object> Strings(Dictionary<string, object> schema, JsonFieldAttribute field)
        {
            if (field == null) return schema;
            if (field.MinLength >= 0) schema["minLength"] = (long)field.MinLength;
            if (field.MaxLength >= 0) schema["maxLength"] = (long)field.MaxLength;
            if (field.Pattern != null) schema["pattern"] = field.Pattern;
            if (field.Enum != null) schema["enum"] = new List<object>(field.Enum);
            return Described(schema, field);
        }

        static Dictionary<string, object> Described(Dictionary<string, object> schema, JsonFieldAttribute field)
        {
            if (field != null && !string.IsNullOrEmpty(field.Description)) schema["description"] = field.Description;
            return schema;
        }

        // The keywords of a list field that apply to its items: all but the item counts (and the description).
        static JsonFieldAttribute ItemKeywords(JsonFieldAttribute field)
        {
            if (field == null) return null;
            return new JsonFieldAttribute
            {
                Minimum = field.Minimum, Maximum = field.Maximum, MinLength = field.MinLength, MaxLength = field.MaxLength,
                Pattern = field.Pattern, Enum = field.Enum,
            };
        }

        // An integer bound: the field's within the type's range, else the type's own (unless unbounded).
        static void Bound(Dictionary<string, object> schema, string key, double given, long typeBound, bool unbounded)
        {
            bool lower = key == "minimum";
            if (double.IsNaN(given))
            {
                if (!unbounded) schema[key] = typeBound;
                return;
            }
            double rounded = lower ? Math.Ceiling(given) : Math.Floor(given);
            if (!unbounded) rounded = lower ? Math.Max(rounded, typeBound) : Math.Min(rounded, typeBound);
            schema[key] = Math.Abs(rounded) < 9e18 ? (object)(long)rounded : rounded;
        }

        static bool IntegerRange(Type type, out long low, out long high)
        {
            low = 0;
            high = 0;
            if (type == typeof(sbyte)) { low = sbyte.MinValue; high = sbyte.MaxValue; return true; }
            if (type == typeof(byte)) { low = byte.MinValue; high = byte.MaxValue; return true; }
            if (type == typeof(short)) { low = short.MinValue; high = short.MaxValue; return true; }
            if (type == typeof(ushort)) { low = ushort.MinValue; high = ushort.MaxValue; return true; }
            if (type == typeof(int)) { low = int.MinValue; high = int.MaxValue; return true; }
            if (type == typeof(uint)) { low = uint.MinValue; high = uint.MaxValue; return true; }
            if (type == typeof(long)) { low = long.MinValue; high = long.MaxValue; return true; }
            if (type == typeof(ulong)) { low = 0; high = long.MaxValue; return true; }
            return false;
        }
    }

    /// <summary>
    /// The JSON trees the client reads (null, bool, long, ulong, double, string, List&lt;object&gt;,
    /// Dictionary&lt;string, object&gt;) into C# objects: the fields <see cref="JsonSchema.For{T}"/>
    /// describes, the way Unity's JsonUtility fills them (keys the type has no field for are
    /// ignored, fields without a key keep their initial value). Enums are read from their names
    /// or numbers. A value that does not fit its field throws FormatException, naming where.
    /// </summary>
    public static class JsonMapper
    {
        const int MaxDepth = 64;

        public static T ToObject<T>(object json) { return (T)ToObject(json, typeof(T)); }

        public static object ToObject(object json, Type type)
        {
            if (type == null) throw new ArgumentNullException("type");
            return Read(json, type, "$", 0);
        }

        static object Read(object value, Type type, string path, int depth)
        {
            if (depth > MaxDepth) throw new FormatException(path + ": nested more than " + MaxDepth + " deep");
            if (type == typeof(object)) return value;
            Type underlying = Nullable.GetUnderlyingType(type);
            if (value == null)
            {
                if (!type.IsValueType || underlying != null) return null;
                throw Mismatch(path, value, type);
            }
            if (underlying != null) type = underlying;
            if (type == typeof(string))
            {
                var text = value as string;
                if (text == null) throw Mismatch(path, value, type);
                return text;
            }
            if (type == typeof(char))
            {
                var text = value as string;
                if (text == null || text.Length != 1) throw Mismatch(path, value, type);
                return text[0];
            }
            if (type == typeof(bool))
            {
                if (!(value is bool)) throw Mismatch(path, value, type);
                return value;
            }
            if (type.IsEnum) return ReadEnum(value, type, path);
            if (type.IsPrimitive || type == typeof(decimal)) return ReadNumber(value, type, path);
            Type item = JsonSchema.ItemType(type);
            if (item != null)
            {
                var items = value as List<object>;
                if (items == null) throw Mismatch(path, value, type);
                if (type.IsArray)
                {
                    Array array = Array.CreateInstance(item, items.Count);
                    for (int i = 0; i < items.Count; i++) array.SetValue(Read(items[i], item, path + "[" + i + "]", depth + 1), i);
                    return array;
                }
                var list = (IList)Activator.CreateInstance(type);
                for (int i = 0; i < items.Count; i++) list.Add(Read(items[i], item, path + "[" + i + "]", depth + 1));
                return list;
            }
            var map = value as Dictionary<string, object>;
            if (typeof(IDictionary).IsAssignableFrom(type))
            {
                Type valueType = JsonSchema.DictionaryValueType(type);
                if (map == null || valueType == null) throw Mismatch(path, value, type);
                var dictionary = (IDictionary)Activator.CreateInstance(type);
                foreach (var pair in map) dictionary[pair.Key] = Read(pair.Value, valueType, path + "." + pair.Key, depth + 1);
                return dictionary;
            }
            if (map == null || type.IsInterface || type.IsAbstract) throw Mismatch(path, value, type);
            // A struct is boxed here, so setting its fields through reflection changes this copy.
            object target = Activator.CreateInstance(type);
            foreach (FieldInfo field in JsonSchema.SerializedFields(type))
            {
                object given;
                if (map.TryGetValue(field.Name, out given))
                    field.SetValue(target, Read(given, field.FieldType, path + "." + field.Name, depth + 1));
            }
            return target;
        }

        static object ReadEnum(object value, Type type, string path)
        {
            var name = value as string;
            if (name != null)
            {
                if (!System.Enum.IsDefined(type, name)) throw Mismatch(path, value, type);
                return System.Enum.Parse(type, name);
            }
            if (value is long || value is ulong) return System.Enum.ToObject(type, value);
            throw Mismatch(path, value, type);
        }

        static object ReadNumber(object value, Type type, string path)
        {
            if (!(value is long || value is ulong || value is double)) throw Mismatch(path, value, type);
            bool integral = type != typeof(float) && type != typeof(double) && type != typeof(decimal);
            if (integral && value is double)
            {
                double d = (double)value;
                if (Math.Floor(d) != d) throw Mismatch(path, value, type);
            }
            try
            {
                return Convert.ChangeType(value, type, CultureInfo.InvariantCulture);
            }
            catch (OverflowException)
            {
                throw new FormatException(path + ": " + Convert.ToString(value, CultureInfo.InvariantCulture) + " does not fit a " + type.Name);
            }
        }

        static FormatException Mismatch(string path, object value, Type type)
        {
            string got = value == null ? "null" : value is string ? "\"" + value + "\"" : value.GetType().Name;
            return new FormatException(path + ": expected a " + type.Name + ", got " + got);
        }
    }
}
