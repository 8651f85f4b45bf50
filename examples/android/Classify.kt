// Classify a Bitmap on Android with the TFLite file an edge_sdk bundle ships, using the TFLite Metadata inside it.
//
// The bundle's `tflite/fp32.tflite` (or `tflite/int8.tflite`) of a classifier carries TFLite Metadata written by
// converters/tflite_metadata.py with MediaPipe's metadata writer:
//   - model name / version / description / author / licence;
//   - the input: for a single NHWC image input (Keras / TensorFlow models) an image tensor with
//     NormalizationOptions = the manifest's preprocessing on 0-255 pixels, so the Task Library's ImageClassifier
//     and Android Studio's ML Model Binding take a Bitmap directly; for NCHW inputs (PyTorch models keep their
//     layout) a feature tensor whose description spells the preprocessing out;
//   - the output "scores" with the associated file `labels.txt` (TENSOR_AXIS_LABELS), one label per class.
//
// NHWC image models, shortest path (com.google.mediapipe:tasks-vision, or the TFLite Task Library):
//     val classifier = ImageClassifier.createFromFile(context, "fp32.tflite")
//
// Any layout (below): the LiteRT Interpreter, labels from the metadata, normalization from the metadata when it
// has it, else from the bundle's manifest.json "preprocessing" (the same numbers the device agent uses).
// Gradle (Google Maven; the LiteRT names of org.tensorflow:tensorflow-lite and :tensorflow-lite-metadata):
//     implementation("com.google.ai.edge.litert:litert:1.0.1")           // or newer
//     implementation("com.google.ai.edge.litert:litert-metadata:1.0.1")
// Assets: copy tflite/fp32.tflite and manifest.json from the bundle into src/main/assets/ and keep the model
// uncompressed (memory-mapped): android { androidResources { noCompress += "tflite" } }
//
//     Classifier(context).use { c -> c.classify(bitmap).forEach { (label, p) -> Log.i("edge", "$label $p") } }

import android.content.Context
import android.graphics.Bitmap
import android.graphics.Color
import java.io.Closeable
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.MappedByteBuffer
import java.nio.channels.FileChannel
import org.json.JSONObject
import org.tensorflow.lite.Interpreter
import org.tensorflow.lite.support.metadata.MetadataExtractor
import org.tensorflow.lite.support.metadata.schema.NormalizationOptions
import org.tensorflow.lite.support.metadata.schema.ProcessUnitOptions

class Classifier(context: Context, model: String = "fp32.tflite", manifest: String = "manifest.json") : Closeable {
    private val interpreter: Interpreter
    val labels: List<String>
    private val nchw: Boolean
    private val height: Int
    private val width: Int
    private val channels: Int
    private val mean: FloatArray  // per channel, on 0-255 pixel values
    private val std: FloatArray
    private val bgr: Boolean

    init {
        val buffer = loadAsset(context, model)
        interpreter = Interpreter(buffer, Interpreter.Options().setNumThreads(2))
        val metadata = MetadataExtractor(buffer)
        labels = metadata.getAssociatedFile("labels.txt").bufferedReader().readLines().filter { it.isNotBlank() }

        val shape = interpreter.getInputTensor(0).shape()  // [1, C, H, W] (PyTorch) or [1, H, W, C]
        nchw = shape[1] == 1 || shape[1] == 3
        channels = if (nchw) shape[1] else shape[3]
        height = if (nchw) shape[2] else shape[1]
        width = if (nchw) shape[3] else shape[2]

        val pre = JSONObject(context.assets.open(manifest).bufferedReader().readText()).getJSONObject("preprocessing")
        bgr = pre.optString("color") == "BGR"
        val norm = metadata.getInputTensorMetadata(0)?.let { t ->
            (0 until t.processUnitsLength()).map { t.processUnits(it) }
                .firstOrNull { it.optionsType() == ProcessUnitOptions.NormalizationOptions }
                ?.let { it.options(NormalizationOptions()) as NormalizationOptions }
        }
        if (norm != null) {  // (pixel - mean) / std on 0-255 values, one value or one per channel
            mean = perChannel(FloatArray(norm.meanLength()) { norm.mean(it) })
            std = perChannel(FloatArray(norm.stdLength()) { norm.std(it) })
        } else {  // the manifest's (pixel * scale - mean) / std == (pixel - mean/scale) / (std/scale)
            val scale = pre.optDouble("scale", 1.0 / 255).toFloat()
            val m = pre.getJSONArray("mean"); val s = pre.getJSONArray("std")
            mean = perChannel(FloatArray(m.length()) { m.getDouble(it).toFloat() / scale })
            std = perChannel(FloatArray(s.length()) { s.getDouble(it).toFloat() / scale })
        }
    }

    /** Top-k (label, score); the bitmap is resized to the input (crop it first as the manifest's resize_mode says). */
    fun classify(bitmap: Bitmap, k: Int = 5): List<Pair<String, Float>> {
        val input = ByteBuffer.allocateDirect(4 * channels * height * width).order(ByteOrder.nativeOrder())
        val pixels = IntArray(width * height)
        Bitmap.createScaledBitmap(bitmap, width, height, true).getPixels(pixels, 0, width, 0, 0, width, height)
        fun value(px: Int, c: Int): Float {
            val rgb = floatArrayOf(Color.red(px).toFloat(), Color.green(px).toFloat(), Color.blue(px).toFloat())
            val v = when {
                channels == 1 -> 0.299f * rgb[0] + 0.587f * rgb[1] + 0.114f * rgb[2]
                bgr -> rgb[2 - c]
                else -> rgb[c]
            }
            return (v - mean[c]) / std[c]
        }
        if (nchw) {
            for (c in 0 until channels) for (px in pixels) input.putFloat(value(px, c))
        } else {
            for (px in pixels) for (c in 0 until channels) input.putFloat(value(px, c))
        }
        input.rewind()

        val out = interpreter.getOutputTensor(0)
        val scores = Array(1) { FloatArray(out.shape().last()) }
        interpreter.run(input, scores)  // fp32 artifact; an int8 one takes/returns int8 (see its quantizationParams)
        return scores[0].withIndex().sortedByDescending { it.value }.take(k)
            .map { (i, score) -> labels.getOrElse(i) { "class $i" } to score }
    }

    override fun close() = interpreter.close()

    private fun perChannel(v: FloatArray) = if (v.size == channels) v else FloatArray(channels) { v[0] }

    private fun loadAsset(context: Context, name: String): MappedByteBuffer =
        context.assets.openFd(name).use { fd ->
            fd.createInputStream().channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
        }
}
