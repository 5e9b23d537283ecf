// Signatures of the UnityEngine API that unity_package uses, as documented for Unity 2021.3 (and
// FindFirstObjectByType, Unity 2023.1+, behind UNITY_2023_1_OR_NEWER in the package), with
// no behaviour, except that UnityEvents keep and call their listeners as Unity's do, PlayerLoop
// keeps the loop it is given, Application's paths and FrameTimingManager's measured frame can be
// set, so that
// tests/unity/UnityLayerTests.cs can watch the components' events, run the player loop's systems
// and play a player build. They let mcs type-check
// Runtime/Unity, Editor and Samples~ here, where Unity cannot run; they are not a Unity build.
// Add a member only as Unity's reference documents it.
#pragma warning disable 0067, 0649, 1591
using System;
using System.Collections.Generic;

namespace UnityEngine
{
    public enum HideFlags { None = 0, HideAndDontSave = 61 }
    public enum RuntimeInitializeLoadType { AfterSceneLoad, BeforeSceneLoad, AfterAssembliesLoaded, BeforeSplashScreen, SubsystemRegistration }
    public enum TextureFormat { RGBA32 = 4 }
    public enum TextureWrapMode { Repeat, Clamp }
    public enum PrimitiveType { Sphere, Capsule, Cylinder, Cube, Plane, Quad }

    public class Object
    {
        public string name { get { return null; } set { } }
        public HideFlags hideFlags { get; set; }
        public static void Destroy(Object obj) { }
        public static void DontDestroyOnLoad(Object target) { }
        public static T FindObjectOfType<T>() where T : Object { return null; }
        public static T FindFirstObjectByType<T>() where T : Object { return null; }
        public static bool operator ==(Object x, Object y) { return ReferenceEquals(x, y); }
        public static bool operator !=(Object x, Object y) { return !ReferenceEquals(x, y); }
        public static implicit operator bool(Object exists) { return !ReferenceEquals(exists, null); }
        public override bool Equals(object other) { return ReferenceEquals(this, other); }
        public override int GetHashCode() { return 0; }
    }

    public class Component : Object
    {
        public GameObject gameObject { get { return null; } }
        public Transform transform { get { return null; } }
        public T GetComponent<T>() { return default(T); }
    }

    public class Behaviour : Component
    {
        public bool enabled { get; set; }
        public bool isActiveAndEnabled { get { return enabled; } }
    }
    public class MonoBehaviour : Behaviour { }

    public sealed class GameObject : Object
    {
        public GameObject(string name) { }
        public Transform transform { get { return null; } }
        public T AddComponent<T>() where T : Component { return null; }
        public T GetComponent<T>() { return default(T); }
        public static GameObject CreatePrimitive(PrimitiveType type) { return null; }
    }

    public class Transform : Component
    {
        public Transform parent { get; set; }
        public Vector3 localScale { get; set; }
        public void SetParent(Transform parent, bool worldPositionStays) { }
    }

    public struct Vector2 { public float x, y; }
    public struct Vector3 { public float x, y, z; public Vector3(float x, float y, float z) { this.x = x; this.y = y; this.z = z; } }

    public struct Rect
    {
        public Rect(float x, float y, float width, float height) { this.x = x; this.y = y; this.width = width; this.height = height; }
        public float x, y, width, height;
        public float xMax { get { return x + width; } }
    }

    public static class Screen { public static int width { get { return 0; } } public static int height { get { return 0; } } }
    public enum RuntimePlatform { OSXEditor = 0, OSXPlayer = 1, WindowsPlayer = 2, WindowsEditor = 7, LinuxPlayer = 13, LinuxEditor = 16 }

    public static class Application
    {
        public static bool isPlaying { get { return false; } }
        // Settable only here, so that tests can play a player build in a folder of their own.
        public static bool isEditor { get; set; }
        public static string streamingAssetsPath { get; set; }
        public static string dataPath { get; set; }
        public static RuntimePlatform platform { get; set; }
    }

    public struct FrameTiming
    {
        public ulong cpuTimePresentCalled;
        public ulong cpuTimeFrameComplete;
        public double cpuFrameTime;
        public double gpuFrameTime;
        public float heightScale;
        public float widthScale;
        public uint syncInterval;
    }

    public static class FrameTimingManager
    {
        static FrameTiming? _captured;
        // Only here: what Unity would have measured for the last frame (null: nothing measured, as
        // without "Frame Timing Stats"), taken by the next CaptureFrameTimings.
        public static FrameTiming? measured { get; set; }
        public static void CaptureFrameTimings() { _captured = measured; }
        public static uint GetLatestTimings(uint numFrames, FrameTiming[] timings)
        {
            if (numFrames == 0 || timings == null || timings.Length == 0 || !_captured.HasValue) return 0;
            timings[0] = _captured.Value;
            return 1;
        }
        public static ulong GetCpuTimerFrequency() { return 0; }
        public static ulong GetGpuTimerFrequency() { return 0; }
        public static float GetVSyncsPerSecond() { return 0f; }
    }

    public static class JsonUtility
    {
        public static string ToJson(object obj, bool prettyPrint) { return "{}"; }
        public static void FromJsonOverwrite(string json, object objectToOverwrite) { }
    }

    public static class Debug
    {
        public static void Log(object message) { }
        public static void LogWarning(object message) { }
        public static void LogWarning(object message, Object context) { }
        public static void LogError(object message, Object context) { }
        public static void LogException(Exception exception) { }
        public static void LogException(Exception exception, Object context) { }
    }

    public class Texture : Object { public TextureWrapMode wrapMode { get; set; } }
    public sealed class Texture2D : Texture { public Texture2D(int width, int height, TextureFormat textureFormat, bool mipChain) { } }
    public static class ImageConversion { public static bool LoadImage(Texture2D tex, byte[] data, bool markNonReadable) { return true; } }
    public class Material : Object { public void SetTexture(string name, Texture value) { } }
    public class Renderer : Component { public Material material { get; set; } }

    [AttributeUsage(AttributeTargets.Method)] public sealed class RuntimeInitializeOnLoadMethodAttribute : Attribute { public RuntimeInitializeOnLoadMethodAttribute(RuntimeInitializeLoadType loadType) { } }
    [AttributeUsage(AttributeTargets.Class)] public sealed class AddComponentMenu : Attribute { public AddComponentMenu(string menuName) { } }
    [AttributeUsage(AttributeTargets.Class)] public sealed class DisallowMultipleComponent : Attribute { }
    [AttributeUsage(AttributeTargets.Field)] public sealed class SerializeField : Attribute { }
    [AttributeUsage(AttributeTargets.Field, Inherited = true, AllowMultiple = false)] public abstract class PropertyAttribute : Attribute { }
    public class HeaderAttribute : PropertyAttribute { public HeaderAttribute(string header) { } }
    public class TooltipAttribute : PropertyAttribute { public TooltipAttribute(string tooltip) { } }
    public class TextAreaAttribute : PropertyAttribute { public TextAreaAttribute() { } public TextAreaAttribute(int minLines, int maxLines) { } }
    public class RangeAttribute : PropertyAttribute { public RangeAttribute(float min, float max) { } }
    public class MinAttribute : PropertyAttribute { public MinAttribute(float min) { } }

    public class GUIStyle { }
    public class GUIContent { public GUIContent(string text, string tooltip) { } public string text { get; set; } }
    public sealed class GUILayoutOption { }

    public class GUI { public static bool Button(Rect position, GUIContent content, GUIStyle style) { return false; } }

    public class GUILayout
    {
        public static void BeginArea(Rect screenRect) { }
        public static void EndArea() { }
        public static void BeginHorizontal(params GUILayoutOption[] options) { }
        public static void EndHorizontal() { }
        public static void Label(string text, params GUILayoutOption[] options) { }
        public static void Label(string text, GUIStyle style, params GUILayoutOption[] options) { }
        public static string TextField(string text, params GUILayoutOption[] options) { return text; }
        public static string TextArea(string text, params GUILayoutOption[] options) { return text; }
        public static bool Button(string text, params GUILayoutOption[] options) { return false; }
        public static void Space(float pixels) { }
        public static float HorizontalSlider(float value, float leftValue, float rightValue, params GUILayoutOption[] options) { return value; }
        public static GUILayoutOption Width(float width) { return null; }
        public static GUILayoutOption MinWidth(float minWidth) { return null; }
        public static GUILayoutOption MinHeight(float minHeight) { return null; }
    }
}

namespace UnityEngine.Events
{
    public class UnityEvent
    {
        readonly List<Action> _calls = new List<Action>();
        public void AddListener(Action call) { _calls.Add(call); }
        public void Invoke() { foreach (Action call in _calls.ToArray()) call(); }
    }

    public class UnityEvent<T0>
    {
        readonly List<Action<T0>> _calls = new List<Action<T0>>();
        public void AddListener(Action<T0> call) { _calls.Add(call); }
        public void Invoke(T0 arg0) { foreach (Action<T0> call in _calls.ToArray()) call(arg0); }
    }

    public class UnityEvent<T0, T1>
    {
        readonly List<Action<T0, T1>> _calls = new List<Action<T0, T1>>();
        public void AddListener(Action<T0, T1> call) { _calls.Add(call); }
        public void Invoke(T0 arg0, T1 arg1) { foreach (Action<T0, T1> call in _calls.ToArray()) call(arg0, arg1); }
    }
}

namespace UnityEngine.LowLevel
{
    public struct PlayerLoopSystem
    {
        public Type type;
        public PlayerLoopSystem[] subSystemList;
        public UpdateFunction updateDelegate;
        public IntPtr updateFunction;
        public IntPtr loopConditionFunction;
        public delegate void UpdateFunction();
    }

    public class PlayerLoop
    {
        static PlayerLoopSystem? _current;

        public static PlayerLoopSystem GetDefaultPlayerLoop()
        {
            Type[] phases =
            {
                typeof(UnityEngine.PlayerLoop.TimeUpdate), typeof(UnityEngine.PlayerLoop.Initialization),
                typeof(UnityEngine.PlayerLoop.EarlyUpdate), typeof(UnityEngine.PlayerLoop.Update),
                typeof(UnityEngine.PlayerLoop.PostLateUpdate),
            };
            var root = new PlayerLoopSystem { subSystemList = new PlayerLoopSystem[phases.Length] };
            for (int i = 0; i < phases.Length; i++) root.subSystemList[i] = new PlayerLoopSystem { type = phases[i], subSystemList = new PlayerLoopSystem[0] };
            return root;
        }

        public static PlayerLoopSystem GetCurrentPlayerLoop() { return _current ?? GetDefaultPlayerLoop(); }
        public static void SetPlayerLoop(PlayerLoopSystem loop) { _current = loop; }
    }
}

namespace UnityEngine.PlayerLoop
{
    public struct TimeUpdate { }
    public struct Initialization { }
    public struct EarlyUpdate { }
    public struct Update { }
    public struct PostLateUpdate { }
}

namespace UnityEngine.UI
{
    public class RawImage : Behaviour { public Texture texture { get; set; } }
}
