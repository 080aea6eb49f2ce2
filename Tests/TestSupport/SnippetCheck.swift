import Foundation
import Testing

/// Checks that documentation's Swift blocks are compiled by a test file.
public enum SnippetCheck {
    /// The package's root folder.
    public static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// Records an issue for each line of a Swift block of `documents` that does not appear in
    /// `compiledFile` in the block's order (imports may be anywhere; a `@Test` attribute may
    /// carry traits there; a Package.swift fragment is skipped). Returns the blocks checked.
    /// - Parameter including: Which blocks to check, by their text. Default: every block.
    public static func expectEveryBlockCompiled(
        of documents: [URL], in compiledFile: URL, including: (String) -> Bool = { _ in true }
    ) throws -> Int {
        let compiled = try String(contentsOf: compiledFile, encoding: .utf8)
            .split(separator: "\n", omittingEmptySubsequences: false)
            .map { line in
                line.trimmingCharacters(in: .whitespaces)
                    .replacingOccurrences(of: #"^@Test\(.*?\) func"#, with: "@Test func", options: .regularExpression)
            }
        var checked = 0
        for document in documents {
            let text = try String(contentsOf: document, encoding: .utf8)
            let blocks = text.components(separatedBy: "```swift\n").dropFirst().map { $0.components(separatedBy: "```")[0] }
            for block in blocks where including(block) {
                let lines = block.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
                if lines.first?.hasPrefix(".package(") == true { continue }  // a Package.swift fragment
                checked += 1
                var position = compiled.startIndex
                for line in lines {
                    if line.hasPrefix("import ") {
                        #expect(compiled.contains(line), "\(document.lastPathComponent) line not compiled: \(line)")
                        continue
                    }
                    guard let found = compiled[position...].firstIndex(of: line) else {
                        Issue.record("\(document.lastPathComponent) line not compiled here (or out of order): \(line)")
                        break
                    }
                    position = compiled.index(after: found)
                }
            }
        }
        return checked
    }
}
