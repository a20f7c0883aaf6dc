# Homebrew formula for pgtwig's release tarballs: no Rust toolchain needed. The release
# workflow (.github/workflows/release.yml) fills in @VERSION@ and the @SHA256_...@ sums and
# attaches the result to the GitHub release, for a tap (`brew install pgtwig/tap/pgtwig`).
class Pgtwig < Formula
  desc "Database branch for every git branch: copy-on-write Postgres behind one local proxy"
  homepage "https://github.com/pgtwig/pgtwig"
  version "@VERSION@"
  license "Apache-2.0"

  base = "https://github.com/pgtwig/pgtwig/releases/download/v@VERSION@/pgtwig-@VERSION@"
  on_macos do
    on_arm do
      url "#{base}-aarch64-apple-darwin.tar.gz"
      sha256 "@SHA256_AARCH64_APPLE_DARWIN@"
    end
    on_intel do
      url "#{base}-x86_64-apple-darwin.tar.gz"
      sha256 "@SHA256_X86_64_APPLE_DARWIN@"
    end
  end
  on_linux do
    # The musl builds: static, so any Linux that runs Homebrew runs them.
    on_arm do
      url "#{base}-aarch64-unknown-linux-musl.tar.gz"
      sha256 "@SHA256_AARCH64_UNKNOWN_LINUX_MUSL@"
    end
    on_intel do
      url "#{base}-x86_64-unknown-linux-musl.tar.gz"
      sha256 "@SHA256_X86_64_UNKNOWN_LINUX_MUSL@"
    end
  end

  # Managed branches are PostgreSQL clusters; pgtwig finds Homebrew's server binaries.
  depends_on "postgresql@17"

  def install
    # Side by side: pgtwig runs the archiver from its own folder.
    bin.install "bin/pgtwig", "bin/pgtwig-archive-wal"
    man1.install Dir["share/man/man1/*.1"]
    bash_completion.install "share/bash-completion/completions/pgtwig"
    zsh_completion.install "share/zsh/site-functions/_pgtwig"
    fish_completion.install "share/fish/vendor_completions.d/pgtwig.fish"
  end

  test do
    assert_match "pgtwig #{version}", shell_output("#{bin}/pgtwig --version")
    assert_path_exists bin/"pgtwig-archive-wal"
    system "git", "init", "-q", testpath/"app"
    cd testpath/"app" do
      # Before `pgtwig init`, doctor exits 1 (nothing set up) and says what it found.
      output = shell_output("#{bin}/pgtwig doctor --json", 1)
      assert_match "server-binaries", output
    end
  end
end
