// Signatures of the UnityEditor API that unity_package/Editor uses (Unity 2021.3), without
// behaviour: a type check only. See UnityEngine.cs beside this file.
#pragma warning disable 0067, 0649, 1591
using System;
using UnityEngine;

namespace UnityEditor
{
    public enum SerializedPropertyType { Generic = -1, Integer = 0, Boolean = 1, Float = 2, String = 3 }
    public enum MessageType { None, Info, Warning, Error }
    public enum BuildTarget { StandaloneOSX = 2, StandaloneWindows = 5, iOS = 9, Android = 13, StandaloneWindows64 = 19, WebGL = 20, StandaloneLinux64 = 24 }
    public enum SettingsScope { User, Project }

    public class SettingsProvider
    {
        public SettingsProvider(string path, SettingsScope scopes, System.Collections.Generic.IEnumerable<string> keywords = null) { }
        public Action<string> guiHandler { get; set; }
    }

    [AttributeUsage(AttributeTargets.Method)]
    public sealed class SettingsProviderAttribute : Attribute { }

    public sealed class EditorUtility
    {
        public static string OpenFolderPanel(string title, string folder, string defaultName) { return ""; }
    }

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
        public static bool Toggle(string label, bool value, params GUILayoutOption[] options) { return value; }
        public static string TextField(string label, string text, params GUILayoutOption[] options) { return text; }

        public class HorizontalScope : IDisposable
        {
            public HorizontalScope(params GUILayoutOption[] options) { }
            public HorizontalScope(GUIStyle style, params GUILayoutOption[] options) { }
            public void Dispose() { }
        }
    }
}

namespace UnityEditor.Build
{
    public interface IOrderedCallback { int callbackOrder { get; } }
    public interface IPostprocessBuildWithReport : IOrderedCallback { void OnPostprocessBuild(UnityEditor.Build.Reporting.BuildReport report); }
    public class BuildFailedException : Exception { public BuildFailedException(string message) : base(message) { } }
}

namespace UnityEditor.Build.Reporting
{
    public struct BuildSummary
    {
        public string outputPath { get { return null; } }
        public BuildTarget platform { get { return BuildTarget.StandaloneLinux64; } }
    }

    public sealed class BuildReport { public BuildSummary summary { get { return new BuildSummary(); } } }
}

namespace UnityEngine
{
    public class ScriptableObject : Object { }
}
