#include "common/file_util.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/test_util.h"

namespace kls {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using ::testing::UnorderedElementsAre;

class FileUtilTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir(); }
  void TearDown() override { testing::RemoveTree(dir_); }

  std::string Path(const std::string& name) const { return absl::StrCat(dir_, "/", name); }

  // Names of the directory's entries.
  std::vector<std::string> Entries() const {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir_)) {
      names.push_back(e.path().filename().string());
    }
    return names;
  }

  std::string Read(const std::string& name) const {
    absl::StatusOr<std::string> s = ReadFileToString(Path(name));
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : std::string();
  }

  std::string dir_;
};

TEST_F(FileUtilTest, WriteThenReadRoundTrips) {
  std::string binary(70'000, '\0');  // larger than one read buffer, with every byte value
  for (size_t i = 0; i < binary.size(); ++i) binary[i] = static_cast<char>(i * 7);
  ASSERT_TRUE(WriteStringToFile(Path("f"), binary).ok());
  EXPECT_EQ(Read("f"), binary);
  ASSERT_TRUE(WriteStringToFile(Path("f"), "short").ok());  // overwrite shrinks it
  EXPECT_EQ(Read("f"), "short");
  ASSERT_TRUE(WriteStringToFile(Path("empty"), "").ok());
  EXPECT_EQ(Read("empty"), "");
  EXPECT_TRUE(FileExists(Path("f")));
  EXPECT_THAT(Entries(), UnorderedElementsAre("f", "empty"));
}

TEST_F(FileUtilTest, ReadMissingFileIsNotFound) {
  absl::StatusOr<std::string> s = ReadFileToString(Path("missing"));
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr(Path("missing")));
  EXPECT_FALSE(FileExists(Path("missing")));
}

TEST_F(FileUtilTest, WriteIntoMissingDirectoryFailsAndNamesPath) {
  absl::Status s = WriteStringToFile(Path("no/such/dir/f"), "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(Path("no/such/dir/f")));
}

TEST_F(FileUtilTest, CommitMakesTheFileAppearWhole) {
  ASSERT_TRUE(WriteStringToFile(Path("f"), "old contents").ok());
  absl::StatusOr<std::unique_ptr<AtomicFileWriter>> w = AtomicFileWriter::Create(Path("f"));
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->path(), Path("f"));
  EXPECT_THAT((*w)->temp_path(), StartsWith(Path("f.tmp.")));
  ASSERT_TRUE((*w)->Append("new ").ok());
  ASSERT_TRUE((*w)->Append("").ok());
  ASSERT_TRUE((*w)->Append("contents").ok());
  // Before Commit readers still see the old file; the data sits in the temporary file.
  EXPECT_EQ(Read("f"), "old contents");
  EXPECT_EQ(Entries().size(), 2u);
  ASSERT_TRUE((*w)->Commit().ok());
  EXPECT_EQ(Read("f"), "new contents");
  EXPECT_THAT(Entries(), UnorderedElementsAre("f"));
  // Destroying a committed writer keeps the file.
  w->reset();
  EXPECT_EQ(Read("f"), "new contents");
}

TEST_F(FileUtilTest, DestructionWithoutCommitLeavesNothing) {
  {
    absl::StatusOr<std::unique_ptr<AtomicFileWriter>> w = AtomicFileWriter::Create(Path("f"));
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->Append("partial").ok());
    EXPECT_TRUE(FileExists((*w)->temp_path()));
  }
  EXPECT_TRUE(Entries().empty());

  // An existing file is left as it was.
  ASSERT_TRUE(WriteStringToFile(Path("g"), "keep").ok());
  {
    absl::StatusOr<std::unique_ptr<AtomicFileWriter>> w = AtomicFileWriter::Create(Path("g"));
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->Append("discarded").ok());
  }
  EXPECT_EQ(Read("g"), "keep");
  EXPECT_THAT(Entries(), UnorderedElementsAre("g"));
}

TEST_F(FileUtilTest, TwoWritersOfOnePathDoNotCollide) {
  absl::StatusOr<std::unique_ptr<AtomicFileWriter>> a = AtomicFileWriter::Create(Path("f"));
  absl::StatusOr<std::unique_ptr<AtomicFileWriter>> b = AtomicFileWriter::Create(Path("f"));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NE((*a)->temp_path(), (*b)->temp_path());
  ASSERT_TRUE((*a)->Append("from a").ok());
  ASSERT_TRUE((*b)->Append("from b, longer").ok());
  ASSERT_TRUE((*b)->Commit().ok());
  EXPECT_EQ(Read("f"), "from b, longer");
  ASSERT_TRUE((*a)->Commit().ok());  // the last commit wins, whole
  EXPECT_EQ(Read("f"), "from a");
  EXPECT_THAT(Entries(), UnorderedElementsAre("f"));
}

// Regression: the temporary name was `<path>.tmp.<pid>`, so two threads writing one path opened
// the same temporary file: contents interleaved, or one rename found the file already gone.
TEST_F(FileUtilTest, ConcurrentWritesOfOnePathFromThreads) {
  constexpr int kThreads = 8;
  constexpr int kWritesPerThread = 40;
  std::vector<std::string> payloads;
  for (int t = 0; t < kThreads; ++t) payloads.push_back(std::string(64 * 1024 + t, 'a' + t));
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kWritesPerThread; ++i) {
        if (!WriteStringToFile(Path("shared"), payloads[t]).ok()) ++failures[t];
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], 0) << "thread " << t;
  const std::string final_contents = Read("shared");
  bool whole = false;
  for (const std::string& p : payloads) whole = whole || final_contents == p;
  EXPECT_TRUE(whole) << "final file (" << final_contents.size() << " bytes) is no single payload";
  EXPECT_THAT(Entries(), UnorderedElementsAre("shared"));
}

TEST_F(FileUtilTest, StaleTemporaryFileIsNotReused) {
  // The counter is process-wide and sequential: the next writer would take name n + 1.
  absl::StatusOr<std::unique_ptr<AtomicFileWriter>> first = AtomicFileWriter::Create(Path("f"));
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string prefix = absl::StrCat(Path("f"), ".tmp.", ::getpid(), ".");
  ASSERT_THAT((*first)->temp_path(), StartsWith(prefix));
  const uint64_t n = std::stoull((*first)->temp_path().substr(prefix.size()));
  const std::string stale = absl::StrCat(prefix, n + 1);
  ASSERT_TRUE(WriteStringToFile(stale, "left by a crashed process").ok());

  absl::StatusOr<std::unique_ptr<AtomicFileWriter>> second = AtomicFileWriter::Create(Path("f"));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_NE((*second)->temp_path(), stale);
  ASSERT_TRUE((*second)->Append("fresh").ok());
  ASSERT_TRUE((*second)->Commit().ok());
  EXPECT_EQ(Read("f"), "fresh");
  absl::StatusOr<std::string> untouched = ReadFileToString(stale);
  ASSERT_TRUE(untouched.ok());
  EXPECT_EQ(*untouched, "left by a crashed process");
}

TEST_F(FileUtilTest, MisuseIsFailedPrecondition) {
  absl::StatusOr<std::unique_ptr<AtomicFileWriter>> w = AtomicFileWriter::Create(Path("f"));
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->Commit().ok());
  EXPECT_EQ((*w)->Append("x").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*w)->Commit().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Read("f"), "");
}

TEST_F(FileUtilTest, FailedCommitLeavesTargetAndNoTemporaryFile) {
  // Renaming a file over a non-empty directory fails.
  std::filesystem::create_directory(Path("d"));
  ASSERT_TRUE(WriteStringToFile(Path("d/inner"), "x").ok());
  absl::StatusOr<std::unique_ptr<AtomicFileWriter>> w = AtomicFileWriter::Create(Path("d"));
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->Append("data").ok());
  absl::Status s = (*w)->Commit();
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(Path("d")));
  EXPECT_THAT(Entries(), UnorderedElementsAre("d"));
  EXPECT_TRUE(std::filesystem::is_directory(Path("d")));
}

TEST_F(FileUtilTest, MappedFileMapsWholeFile) {
  ASSERT_TRUE(WriteStringToFile(Path("m"), "mapped bytes").ok());
  absl::StatusOr<std::unique_ptr<MappedFile>> m = MappedFile::Open(Path("m"));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(std::string(reinterpret_cast<const char*>((*m)->data()), (*m)->size()), "mapped bytes");
  EXPECT_EQ((*m)->path(), Path("m"));

  ASSERT_TRUE(WriteStringToFile(Path("e"), "").ok());
  absl::StatusOr<std::unique_ptr<MappedFile>> e = MappedFile::Open(Path("e"));
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->size(), 0u);

  EXPECT_EQ(MappedFile::Open(Path("missing")).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(MappedFile::Open(dir_).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kls
