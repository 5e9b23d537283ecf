using Loraloom.Unity;
using UnityEngine;

namespace Loraloom.Samples
{
    /// <summary>
    /// Generates an image with an image adapter and shows it on a quad. Add it to an empty
    /// GameObject and press Play; it builds the quad, the daemon component and a LoraloomImage.
    /// </summary>
    public sealed class ImageDemo : MonoBehaviour
    {
        [TextArea] public string prompt = "a pixel-art map tile, forest";
        [AdapterName(Loraloom.Core.AdapterKind.Image)] public string adapter = "";
        [Range(0f, 2f)] public float adapterScale = 0.8f;
        public int size = 256;
        public int steps = 8;

        LoraloomImage _image;
        float _progress;
        string _error = "";

        void Awake()
        {
            if (LoraloomDaemon.Instance == null) new GameObject("Loraloom Daemon").AddComponent<LoraloomDaemon>();
            GameObject quad = GameObject.CreatePrimitive(PrimitiveType.Quad);
            quad.transform.SetParent(transform, false);
            quad.transform.localScale = new Vector3(4f, 4f, 1f);
            _image = gameObject.AddComponent<LoraloomImage>();
            _image.targetRenderer = quad.GetComponent<Renderer>();
            _image.ProgressChanged.AddListener(p => _progress = p);
            _image.RequestFailed.AddListener((code, message) => _error = code + ": " + message);
            _image.ImageReady.AddListener(t => _error = "");
        }

        void Generate()
        {
            _image.prompt = prompt;
            _image.width = size;
            _image.height = size;
            _image.steps = steps;
            _image.adapters.Clear();
            if (!string.IsNullOrEmpty(adapter)) _image.adapters.Add(new ImageAdapterSlot { name = adapter, scale = adapterScale });
            _progress = 0f;
            _image.GenerateAndForget();
        }

        void OnGUI()
        {
            GUILayout.BeginArea(new Rect(10, 10, 420, 200));
            LoraloomDaemon daemon = LoraloomDaemon.Instance;
            GUILayout.Label("Daemon: " + (daemon != null ? daemon.Status : "none"));
            if (daemon != null && daemon.Client != null && daemon.Client.Welcome != null && daemon.Client.Welcome.ImageModel == null)
                GUILayout.Label("This daemon has no image model (start it with --image-model default or a diffusers folder).");
            prompt = GUILayout.TextField(prompt);
            if (GUILayout.Button("Generate")) Generate();
            GUILayout.HorizontalSlider(_progress, 0f, 1f);
            if (_error.Length > 0) GUILayout.Label("error " + _error);
            GUILayout.EndArea();
        }
    }
}
