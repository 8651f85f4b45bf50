// Classify a photo or a camera frame on iOS / macOS with the Core ML package an edge_sdk bundle ships.
//
// The bundle's `coreml/fp32.mlpackage` (or `coreml/int8.mlpackage`) of an image classifier has, as written by
// converters/coreml_common.py and checked by converters/coreml_spec.py:
//   - input  "input": an ImageType (RGB/BGR/GRAY, the model's size) whose scale/bias are the manifest's
//     preprocessing, so Vision feeds a CGImage / CVPixelBuffer directly: no pixel-buffer code;
//   - outputs "classLabel" (String), "classLabel_probs" ([String: Double], a ClassifierConfig with the bundle's
//     labels, so Vision returns VNClassificationObservation) and the source's tensor output "output";
//   - metadata: author / version / licence / description, and creator-defined keys
//     "edge_sdk.preprocessing" (the manifest's preprocessing JSON), "edge_sdk.vision.imageCropAndScaleOption"
//     ("centerCrop" or "scaleFill": how the agent fits a frame to the input) and "edge_sdk.task".
//
// Use: drag `coreml/fp32.mlpackage` into the Xcode target (rename it, e.g. FashionCNN.mlpackage: Xcode compiles it
// to FashionCNN.mlmodelc) and pass `Bundle.main.url(forResource: "FashionCNN", withExtension: "mlmodelc")!`;
// or download the package and compile it on the device with `try await MLModel.compileModel(at: packageURL)`.
//
//     let classifier = try BundleClassifier(compiledModelURL: url)
//     for (label, p) in try classifier.classify(cgImage) { print(label, p) }

import CoreGraphics
import CoreML
import Foundation
import ImageIO
import Vision

final class BundleClassifier {
    private let request: VNCoreMLRequest
    /// The agent crops the central `cropFraction` of the short side before resizing (resize_mode "center_crop").
    private let cropFraction: CGFloat?

    init(compiledModelURL: URL, computeUnits: MLComputeUnits = .all) throws {
        let config = MLModelConfiguration()
        config.computeUnits = computeUnits
        let model = try MLModel(contentsOf: compiledModelURL, configuration: config)
        request = VNCoreMLRequest(model: try VNCoreMLModel(for: model))

        // Fit the frame to the input the way the bundle's agent does, so Vision and the agent agree.
        let meta = model.modelDescription.metadata[.creatorDefinedKey] as? [String: String] ?? [:]
        let centerCrop = meta["edge_sdk.vision.imageCropAndScaleOption"] == "centerCrop"
        request.imageCropAndScaleOption = centerCrop ? .centerCrop : .scaleFill
        var fraction: CGFloat?
        if centerCrop, let json = meta["edge_sdk.preprocessing"]?.data(using: .utf8),
           let pre = try? JSONSerialization.jsonObject(with: json) as? [String: Any],
           let f = pre["crop_fraction"] as? Double, f < 1 {
            fraction = CGFloat(f)
        }
        cropFraction = fraction
    }

    /// Top-k (label, confidence) for one image; `orientation` as the camera reports it (EXIF).
    func classify(_ image: CGImage, orientation: CGImagePropertyOrientation = .up,
                  top k: Int = 5) throws -> [(label: String, confidence: Float)] {
        cropLikeTheAgent(width: image.width, height: image.height, orientation: orientation)
        let handler = VNImageRequestHandler(cgImage: image, orientation: orientation, options: [:])
        return try run(handler, top: k)
    }

    /// A camera frame (AVCaptureVideoDataOutput): the same request on the pixel buffer, no conversion.
    func classify(_ frame: CVPixelBuffer, orientation: CGImagePropertyOrientation = .right,
                  top k: Int = 5) throws -> [(label: String, confidence: Float)] {
        cropLikeTheAgent(width: CVPixelBufferGetWidth(frame), height: CVPixelBufferGetHeight(frame),
                         orientation: orientation)
        let handler = VNImageRequestHandler(cvPixelBuffer: frame, orientation: orientation, options: [:])
        return try run(handler, top: k)
    }

    /// centerCrop alone takes the whole short side; the agent takes its central fraction f (0.875 for ImageNet's
    /// 224-of-256): the same square as Vision's region of interest (normalised coordinates).
    /// The region is in the oriented (upright) image, where a .left / .right frame has width and height swapped.
    private func cropLikeTheAgent(width: Int, height: Int, orientation: CGImagePropertyOrientation) {
        guard let f = cropFraction else { return }
        let turned = [.left, .right, .leftMirrored, .rightMirrored].contains(orientation)
        let w = CGFloat(turned ? height : width), h = CGFloat(turned ? width : height), side = f * min(w, h)
        request.regionOfInterest = CGRect(x: (1 - side / w) / 2, y: (1 - side / h) / 2,
                                          width: side / w, height: side / h)
    }

    private func run(_ handler: VNImageRequestHandler, top k: Int) throws -> [(label: String, confidence: Float)] {
        try handler.perform([request])
        let observations = request.results as? [VNClassificationObservation] ?? []
        return observations.prefix(k).map { (label: $0.identifier, confidence: $0.confidence) }
    }
}
