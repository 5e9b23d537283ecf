// Signatures of the UnityEditor API that unity_package/Editor uses (Unity 2021.3), without
// behaviour: a type check only. See UnityEngine.cs beside this file.
#pragma warning disable 0067, 0649, 1591
using System;
using UnityEngine;

namespace UnityEditor
{
    public enum SerializedPropertyType { Generic = -1, Integer = 0, Boolean = 1, Float = 2, String = 3 }
    public enum MessageType { None, Info, Warning, Error }

    public class SerializedProperty
    {
        public SerializedPropertyType propertyType { get { return SerializedPropertyType.String; } }
        public string stringValue { get; set; }
    }

    public abstract class GUIDrawer { }

    public abstract class PropertyDrawer : GUIDrawer
    {
        public PropertyAttribute attribute { get { return null; } }
        public virtual void OnGUI(Rect position, SerializedProperty property, GUIContent label) { }
    }

    [AttributeUsage(AttributeTargets.Class, AllowMultiple = true)]
    public sealed class CustomPropertyDrawer : Attribute { public CustomPropertyDrawer(Type type) { } }

    [AttributeUsage(AttributeTargets.Method, AllowMultiple = true)]
    public sealed class MenuItem : Attribute { public MenuItem(string itemName) { } }

    public class EditorWindow : ScriptableObject
    {
        public static T GetWindow<T>(string title) where T : EditorWindow { return null; }
        public void Show() { }
        public void Repaint() { }
    }

    public class EditorStyles
    {
        public static GUIStyle miniButton { get { return null; } }
        public static GUIStyle toolbar { get { return null; } }
        public static GUIStyle boldLabel { get { return null; } }
        public static GUIStyle miniLabel { get { return null; } }
        public static GUIStyle wordWrappedMiniLabel { get { return null; } }
    }

    public sealed class EditorGUI
    {
        public static GUIContent BeginProperty(Rect totalPosition, GUIContent label, SerializedProperty property) { return label; }
        public static void EndProperty() { }
        public static void LabelField(Rect position, string label, string label2) { }
        public static string TextField(Rect position, GUIContent label, string text) { return text; }
        public static int Popup(Rect position, string label, int selectedIndex, string[] displayedOptions) { return selectedIndex; }

        public struct DisabledScope : IDisposable
        {
            public DisabledScope(bool disabled) { }
            public void Dispose() { }
        }
    }

    public sealed class EditorGUILayout
    {
        public static void Space() { }
        public static void LabelField(string label, string label2, params GUILayoutOption[] options) { }
        public static void LabelField(string label, GUIStyle style, params GUILayoutOption[] options) { }
        public static Vector2 BeginScrollView(Vector2 scrollPosition, params GUILayoutOption[] options) { return scrollPosition; }
        public static void EndScrollView() { }
        public static void HelpBox(string message, MessageType type) { }

        public class HorizontalScope : IDisposable
        {
            public HorizontalScope(params GUILayoutOption[] options) { }
            public HorizontalScope(GUIStyle style, params GUILayoutOption[] options) { }
            public void Dispose() { }
        }
    }
}

namespace UnityEngine
{
    public class ScriptableObject : Object { }
}
