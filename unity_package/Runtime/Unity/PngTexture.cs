using Loraloom.Core;
using UnityEngine;

namespace Loraloom.Unity
{
    /// <summary>PNG bytes from the daemon to a Texture2D (main thread only, like every Unity object).</summary>
    public static class PngTexture
    {
        public static Texture2D Load(byte[] png, string name = "loraloom image")
        {
            // The size is a placeholder: LoadImage resizes the texture to the PNG's own size.
            var texture = new Texture2D(2, 2, TextureFormat.RGBA32, false) { name = name };
            if (!ImageConversion.LoadImage(texture, png, false))
            {
                Object.Destroy(texture);
                throw new LoraloomException(ErrorCodes.BadMessage, "the daemon's image is not a PNG Unity can read");
            }
            texture.wrapMode = TextureWrapMode.Clamp;
            return texture;
        }
    }
}
