using System;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;
using Loraloom.Core;
using UnityEngine;
using UnityEngine.Events;
using UnityEngine.UI;

namespace Loraloom.Unity
{
    /// <summary>One image adapter of a request and its weight, as the inspector shows it.</summary>
    [Serializable]
    public sealed class ImageAdapterSlot
    {
        [AdapterName(AdapterKind.Image)] public string name = "";
        [Range(-8f, 8f)] public float scale = 1f;
    }

    /// <summary>
    /// Generates an image on the daemon's image model with a mix of image adapters and shows it on
    /// a RawImage and/or a Renderer. The built-in default image model is a placeholder that only
    /// draws noise; point the daemon at a real diffusers folder for pictures.
    /// </summary>
    [AddComponentMenu("Loraloom/Loraloom Image")]
    public sealed class LoraloomImage : MonoBehaviour
    {
        [Tooltip("Leave empty to use LoraloomDaemon.Instance.")]
        [SerializeField] LoraloomDaemon daemon;

        [Header("Request")]
        [TextArea(2, 6)] public string prompt = "";
        [TextArea(1, 4)] public string negativePrompt = "";
        public List<ImageAdapterSlot> adapters = new List<ImageAdapterSlot>();
        [Min(8)] public int width = 512;
        [Min(8)] public int height = 512;
        [Min(1)] public int steps = 20;
        [Range(0f, 50f)] public float guidance = 7.5f;
        [Tooltip("-1 picks a new seed each time.")]
        public long seed = -1;
        public bool generateOnStart;

        [Header("Where it shows")]
        public RawImage targetImage;
        public Renderer targetRenderer;
        [Tooltip("The material texture the image goes to on the renderer.")]
        public string textureProperty = "_MainTex";

        [Header("Events (main thread)")]
        [Tooltip("0..1 as denoising steps finish.")]
        public UnityEvent<float> ProgressChanged = new UnityEvent<float>();
        public UnityEvent<Texture2D> ImageReady = new UnityEvent<Texture2D>();
        [Tooltip("Why a request failed: the error code and the message.")]
        public UnityEvent<string, string> RequestFailed = new UnityEvent<string, string>();

        CancellationTokenSource _current;
        Texture2D _texture;
        bool _destroyed;

        /// <summary>The last image this component made (owned by it: replaced and destroyed with it).</summary>
        public Texture2D Texture { get { return _texture; } }

        /// <summary>The seed of the last image, to make it again.</summary>
        public long LastSeed { get; private set; }

        void Start()
        {
            if (generateOnStart) GenerateAndForget();
        }

        /// <summary>Deprecated: use <see cref="GenerateAsync"/>.</summary>
        [Obsolete("Use GenerateAsync (or GenerateAndForget for UI events).")]
        public Task<Texture2D> Generate() { return GenerateAsync(); }

        /// <summary>
        /// Generates with the current settings; a generation in progress is stopped first. Faults with
        /// <see cref="LoraloomException"/> (after <see cref="RequestFailed"/> fired); ends cancelled
        /// when stopped, when <paramref name="cancellationToken"/> fires or the component is destroyed.
        /// </summary>
        public async Task<Texture2D> GenerateAsync(CancellationToken cancellationToken = default(CancellationToken))
        {
            if (_destroyed) throw new ObjectDisposedException(name);
            StopGeneration();
            var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            _current = stop;
            try
            {
                LoraloomDaemon owner = daemon != null ? daemon : LoraloomDaemon.Instance;
                if (owner == null) throw new LoraloomException(ErrorCodes.DaemonNotFound, "no LoraloomDaemon in the scene");
                LoraloomClient client = await owner.Ready;
                var request = new GenerateImage
                {
                    Prompt = prompt,
                    NegativePrompt = string.IsNullOrEmpty(negativePrompt) ? null : negativePrompt,
                    Width = width,
                    Height = height,
                    Steps = steps,
                    Guidance = guidance,
                    Seed = seed >= 0 ? seed : (long?)null,
                };
                foreach (ImageAdapterSlot slot in adapters)
                    if (slot != null && !string.IsNullOrEmpty(slot.name)) request.Adapters.Add(new AdapterRef(slot.name, slot.scale));
                ImageResult result = await client.GenerateImageAsync(request, p => MainThreadDispatcher.Post(() =>
                {
                    if (!_destroyed && _current == stop) ProgressChanged.Invoke(p.Total > 0 ? (float)p.Step / p.Total : 0f);
                }), stop.Token);
                if (_destroyed || stop.IsCancellationRequested) throw new OperationCanceledException(stop.Token);
                if (result.Images.Count == 0) throw new LoraloomException(ErrorCodes.Internal, "the daemon returned no image");
                LastSeed = result.Seed;
                Show(PngTexture.Load(result.Images[0], "loraloom " + result.Id));
                ImageReady.Invoke(_texture);
                return _texture;
            }
            catch (LoraloomException e)
            {
                if (!_destroyed) RequestFailed.Invoke(e.Code, e.Reason);
                throw;
            }
            finally
            {
                if (_current == stop) _current = null;
                stop.Dispose();
            }
        }

        /// <summary>For UI events and other void callers.</summary>
        public void GenerateAndForget()
        {
            GenerateAsync().ContinueWith(t => Debug.LogException(t.Exception.GetBaseException(), this),
                TaskContinuationOptions.OnlyOnFaulted);
        }

        /// <summary>Deprecated: use <see cref="StopGeneration"/>.</summary>
        [Obsolete("Use StopGeneration.")]
        public void Stop() { StopGeneration(); }

        /// <summary>Stops the image being generated (the daemon stops between steps).</summary>
        public void StopGeneration()
        {
            CancellationTokenSource current = _current;
            _current = null;
            if (current != null) current.Cancel();
        }

        void Show(Texture2D texture)
        {
            if (_texture != null) Destroy(_texture);
            _texture = texture;
            if (targetImage != null) targetImage.texture = texture;
            // The renderer's own material instance, so other objects sharing the material keep theirs.
            if (targetRenderer != null) targetRenderer.material.SetTexture(textureProperty, texture);
        }

        void OnDestroy()
        {
            _destroyed = true;
            StopGeneration();
            if (_texture != null) Destroy(_texture);
        }
    }
}
