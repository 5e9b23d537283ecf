using System;
using Loraloom.Unity;
using UnityEditor;
using UnityEngine;

namespace Loraloom.Editor
{
    /// <summary>A dropdown of the daemon's adapter names for fields marked [AdapterName], beside the plain text.</summary>
    [CustomPropertyDrawer(typeof(AdapterNameAttribute))]
    sealed class AdapterNameDrawer : PropertyDrawer
    {
        const float ButtonWidth = 22f;
        const string BaseModel = "(base model)";

        public override void OnGUI(Rect position, SerializedProperty property, GUIContent label)
        {
            if (property.propertyType != SerializedPropertyType.String)
            {
                EditorGUI.LabelField(position, label.text, "[AdapterName] needs a string field");
                return;
            }
            var kind = ((AdapterNameAttribute)attribute).Kind;
            string[] names = AdapterCatalog.Names(kind);
            EditorGUI.BeginProperty(position, label, property);
            var field = new Rect(position.x, position.y, position.width - ButtonWidth - 2f, position.height);
            var button = new Rect(position.xMax - ButtonWidth, position.y, ButtonWidth, position.height);

            if (names.Length == 0)
            {
                // No daemon to ask (yet): a typed name still works, it is checked when the request is made.
                property.stringValue = EditorGUI.TextField(field, label, property.stringValue);
            }
            else
            {
                var options = new string[names.Length + 1];
                options[0] = BaseModel;
                Array.Copy(names, 0, options, 1, names.Length);
                int current = string.IsNullOrEmpty(property.stringValue) ? 0 : Array.IndexOf(options, property.stringValue);
                if (current < 0)
                {
                    // Keep a name the daemon does not know (renamed, not loaded yet) visible and selectable.
                    Array.Resize(ref options, options.Length + 1);
                    options[options.Length - 1] = property.stringValue;
                    current = options.Length - 1;
                }
                int chosen = EditorGUI.Popup(field, label.text, current, options);
                if (chosen != current) property.stringValue = chosen == 0 ? "" : options[chosen];
            }

            string tip = AdapterCatalog.LastError.Length > 0 ? "Refresh adapter names (last: " + AdapterCatalog.LastError + ")" : "Refresh adapter names from the running daemon";
            using (new EditorGUI.DisabledScope(AdapterCatalog.IsRefreshing || Application.isPlaying))
            {
                if (GUI.Button(button, new GUIContent("\u21bb", tip), EditorStyles.miniButton)) AdapterCatalog.Refresh();
            }
            EditorGUI.EndProperty();
        }
    }
}
