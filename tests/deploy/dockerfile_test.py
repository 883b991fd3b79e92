#!/usr/bin/env python3
"""Static checks of deploy/docker/Dockerfile and .dockerignore (there is no Docker engine here).

It parses the Dockerfile and checks: stages and their references, base images pinned to real tags
and to the CUDA version the project builds with, COPY sources that exist and survive
.dockerignore, the build running scripts/install-deps and the README's cmake build, non-root
numeric users and `kls` as the entrypoint of the final images, and the runtime package list
against the kls binary itself: every library kls links (DT_NEEDED) comes from a listed package or
the base image, every listed package provides one, and every listed package is the runtime side of
a package scripts/install-deps installs (so it exists in Debian 12 with the version we build
against).

    python3 tests/deploy/dockerfile_test.py --kls build/services/cli/kls
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
FINAL_STAGES = ("kls", "kls-cuda")
# Packages of debian:bookworm-slim itself (libc, libgcc, libstdc++: apt needs them).
BASE_IMAGE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}
KLS = None


def run(args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


class Instruction:
    def __init__(self, keyword, value, line):
        self.keyword, self.value, self.line = keyword, value, line

    def __repr__(self):
        return f"line {self.line}: {self.keyword} {self.value[:60]}"


def parse_dockerfile(text):
    """(global ARGs, [stage dicts]) — each stage: name, base, instructions."""
    instructions, buffer, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buffer and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buffer and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, value = buffer.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    global_args, stages = {}, []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "base": words[0], "instructions": [], "line": ins.line})
        elif not stages:
            assert ins.keyword == "ARG", f"{ins}: only ARG may come before the first FROM"
            key, _, default = ins.value.partition("=")
            global_args[key] = default
        else:
            stages[-1]["instructions"].append(ins)
    return global_args, stages


def substitute(text, args):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)),
                  text)


def dockerignore_patterns():
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((re.compile(regex.strip("/") + r"\Z"), negate))
    return patterns


def ignored(path, patterns):
    """Docker's rule: the last matching pattern wins; a pattern matching a parent excludes it."""
    parts = Path(path).parts
    result = False
    for regex, negate in patterns:
        for n in range(1, len(parts) + 1):
            if regex.match("/".join(parts[:n])):
                result = not negate
                break
    return result


def install_deps_packages():
    text = (ROOT / "scripts" / "install-deps").read_text()
    block = re.search(r"^packages=\((.*?)^\)", text, re.S | re.M).group(1)
    words = []
    for line in block.splitlines():
        words += line.split("#", 1)[0].split()
    return words


def depends(packages):
    """The direct Depends of `packages` (one apt-cache call; apt's local package lists)."""
    result = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", *packages])
    if result.returncode != 0:
        raise AssertionError(f"apt-cache depends: {result.stderr}")
    return set(re.findall(r"^\s+\|?Depends: <?([^\s>]+)>?", result.stdout, re.M))


def needed_sonames(binary):
    result = run(["readelf", "-d", binary])
    assert result.returncode == 0, result.stderr
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", result.stdout)


def resolved_paths(binary):
    """soname -> the path the dynamic loader picks here (ldd)."""
    result = run(["ldd", binary])
    assert result.returncode == 0, result.stderr
    return dict(re.findall(r"^\s*(\S+) => (/\S+)", result.stdout, re.M))


def owning_package(path):
    # Debian 12 merged /lib into /usr/lib; dpkg knows each file under one of the two names.
    for candidate in (path, path.replace("/lib/", "/usr/lib/", 1),
                      path.replace("/usr/lib/", "/lib/", 1)):
        result = run(["dpkg", "-S", candidate])
        if result.returncode == 0:
            return result.stdout.split(":", 1)[0].strip()
    return None


class DockerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.global_args, cls.stages = parse_dockerfile(DOCKERFILE.read_text())
        cls.by_name = {s["name"]: s for s in cls.stages if s["name"]}

    def stage_chain(self, name):
        """The stage and the stages it is built FROM, nearest first."""
        chain = []
        while name in self.by_name:
            chain.append(self.by_name[name])
            name = self.by_name[name]["base"]
        return chain

    def instructions(self, name, keyword):
        return [i for s in self.stage_chain(name) for i in s["instructions"]
                if i.keyword == keyword]

    def test_stages_and_base_images(self):
        names = [s["name"] for s in self.stages]
        self.assertEqual(len(names), len(set(names)), f"duplicate stage names: {names}")
        self.assertTrue(all(names), "every stage is named")
        for stage in self.stages:
            base = substitute(stage["base"], self.global_args)
            if base in self.by_name:
                self.assertLess(self.by_name[base]["line"], stage["line"])
                continue
            # An external image: an explicit tag, never latest.
            self.assertRegex(base, r"^[a-z0-9./-]+:[A-Za-z0-9._-]+$", f"stage {stage['name']}")
            self.assertNotRegex(base, r":latest$")
            self.assertRegex(base, r"^(debian:bookworm(-slim)?|"
                                   r"nvidia/cuda:13\.\d+\.\d+-(devel|runtime)-ubuntu24\.04)$")
        for name in FINAL_STAGES:
            self.assertIn(name, self.by_name)

    def test_cuda_images_match_the_toolkit_we_build_with(self):
        devel = self.global_args["CUDA_DEVEL_IMAGE"]
        runtime = self.global_args["CUDA_RUNTIME_IMAGE"]
        dv = re.search(r":(\d+\.\d+)\.\d+-devel", devel).group(1)
        rv = re.search(r":(\d+\.\d+)\.\d+-runtime", runtime).group(1)
        self.assertEqual(dv, rv, "devel and runtime images must be the same CUDA version")
        version_file = Path("/usr/local/cuda/version.json")
        if version_file.exists():  # the toolkit is optional on build machines (README)
            local = json.loads(version_file.read_text())["cuda"]["version"]
            self.assertEqual(".".join(local.split(".")[:2]), dv)
        # The paths copied out of the images name that version.
        for ins in self.instructions("kls-cuda", "COPY") + self.instructions("build-cuda", "COPY"):
            for path in re.findall(r"/usr/local/cuda-(\d+\.\d+)", ins.value):
                self.assertEqual(path, dv, ins)
        self.assertEqual(self.global_args["CUDA_ARCHITECTURES"], "90a")

    def test_copy_sources_exist_and_are_in_the_build_context(self):
        patterns = dockerignore_patterns()
        for stage in self.stages:
            for ins in stage["instructions"]:
                if ins.keyword != "COPY":
                    continue
                words = shlex.split(ins.value)
                options = [w for w in words if w.startswith("--")]
                paths = [w for w in words if not w.startswith("--")]
                sources = paths[:-1]
                source_stage = next((o.split("=", 1)[1] for o in options
                                     if o.startswith("--from=")), None)
                if source_stage is not None:
                    self.assertIn(source_stage, self.by_name, ins)
                    self.assertLess(self.by_name[source_stage]["line"], ins.line, ins)
                    continue
                for source in sources:
                    if source == ".":
                        continue
                    self.assertTrue((ROOT / source).exists(),
                                    f"{ins}: no {source} in the repository")
                    self.assertFalse(ignored(source, patterns),
                                     f"{ins}: .dockerignore drops {source}")

    def test_dockerignore_keeps_sources_and_drops_build_outputs(self):
        patterns = dockerignore_patterns()
        for dropped in (".git", ".venv/bin/python", ".tools/helm/helm", "build/services/cli/kls",
                        "build-h6/CMakeCache.txt", "models/tiny/config.json", "kls-data/x"):
            self.assertTrue(ignored(dropped, patterns), dropped)
        # What the cmake build of the images reads: the top-level CMakeLists.txt, cmake/ and
        # every directory it adds (tests and benchmarks are off in the images).
        root_cmake = (ROOT / "CMakeLists.txt").read_text()
        needed = {"CMakeLists.txt", "cmake/KlsHelpers.cmake", "scripts/install-deps",
                  "scripts/requirements.txt"}
        needed |= {f"{d}/CMakeLists.txt"
                   for d in re.findall(r"^add_subdirectory\((\w+)\)", root_cmake, re.M)}
        for path in sorted(needed):
            self.assertTrue((ROOT / path).exists() or path.startswith(("tests/", "bench/")), path)
            self.assertFalse(ignored(path, patterns), f".dockerignore drops {path}")
        for path in ROOT.glob("services/**/*.cc"):
            self.assertFalse(ignored(str(path.relative_to(ROOT)), patterns), path)

    def test_build_runs_the_readme_setup_and_build(self):
        for build in ("build-cpu", "build-cuda"):
            runs = " ".join(i.value for i in self.instructions(build, "RUN"))
            self.assertIn("scripts/install-deps", runs, build)
            # The configure and build lines of scripts/serve (the README's quick start).
            serve = (ROOT / "scripts" / "serve").read_text()
            generator = re.search(r"cmake -S \. -B \S+ (-G \w+) (-DCMAKE_BUILD_TYPE=\w+)", serve)
            self.assertIsNotNone(generator, "scripts/serve changed its cmake line")
            self.assertIn(f"cmake -S . -B build {generator.group(1)} {generator.group(2)}", runs)
            self.assertIn("cmake --build build", runs)
            self.assertIn("--target kls", runs)
            self.assertIn("install -D -m 0755 -s build/services/cli/kls /out/kls", runs)
        for build, cuda in (("build-cpu", "OFF"), ("build-cuda", "ON")):
            runs = " ".join(i.value for i in self.instructions(build, "RUN"))
            self.assertIn(f"-DKLS_ENABLE_CUDA={cuda}", runs)

    def test_final_images_run_kls_as_a_fixed_non_root_user(self):
        for name in FINAL_STAGES:
            users = self.instructions(name, "USER")
            self.assertTrue(users, f"{name} has no USER")
            user = users[0].value  # the nearest USER wins
            self.assertRegex(user, r"^[1-9][0-9]*(:[1-9][0-9]*)?$",
                             f"{name}: USER must be numeric, non-root")
            self.assertEqual(user, "10001:10001", "the Helm chart's podSecurityContext uses 10001")
            entrypoints = self.instructions(name, "ENTRYPOINT")
            self.assertTrue(entrypoints, name)
            self.assertEqual(json.loads(entrypoints[0].value), ["kls"], name)
            copies = [i.value for i in self.instructions(name, "COPY") if "/out/kls" in i.value]
            self.assertTrue(any(c.endswith("/usr/local/bin/kls") for c in copies), name)
        # The user is created with that id.
        runs = " ".join(i.value for i in self.instructions("runtime-base", "RUN"))
        self.assertIn("--uid 10001", runs)
        self.assertIn("--gid 10001", runs)

    def runtime_packages(self):
        runs = " ".join(i.value for i in self.instructions("runtime-base", "RUN"))
        match = re.search(r"apt-get install -y --no-install-recommends\s+"
                          r"((?:[a-z0-9][a-z0-9.+-]+\s*)+)", runs)
        self.assertIsNotNone(match)
        return match.group(1).split()

    def test_runtime_packages_are_the_runtime_side_of_install_deps(self):
        packages = self.runtime_packages()
        self.assertEqual(packages, sorted(packages), "keep the list sorted")
        dev = install_deps_packages()
        # Their dependencies, and those of the -dev packages among them (libgrpc++-dev pulls
        # libgrpc-dev, whose runtime side is libgrpc29).
        known = depends(dev)
        known |= depends(sorted(d for d in known if d.endswith("-dev")))
        for p in packages:
            self.assertIn(p, known,
                          f"{p} is not a dependency of anything scripts/install-deps installs")
            self.assertFalse(p.endswith("-dev"), p)

    def test_runtime_packages_cover_exactly_what_kls_links(self):
        packages = set(self.runtime_packages())
        resolved = resolved_paths(KLS)
        cuda_copies = " ".join(i.value for i in self.instructions("kls-cuda", "COPY"))
        provided = set()
        for soname in needed_sonames(KLS):
            path = resolved.get(soname)
            self.assertIsNotNone(path, f"kls needs {soname}, which does not resolve here")
            if "/cuda" in path:  # from the CUDA toolkit: copied into kls-cuda
                stem = soname.split(".so")[0]
                self.assertIn(f"/{stem}.so.", cuda_copies, f"kls-cuda does not copy {soname}")
                continue
            package = owning_package(path)
            self.assertIsNotNone(package, f"no Debian package owns {path} ({soname})")
            provided.add(package)
            self.assertTrue(package in packages or package in BASE_IMAGE_PACKAGES,
                            f"kls links {soname} from {package}, which the runtime images lack")
        unused = packages - provided
        self.assertFalse(unused, f"runtime packages kls does not link: {sorted(unused)}")


def main():
    global KLS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kls", required=True, help="the kls binary (its libraries are checked)")
    args, rest = parser.parse_known_args()
    KLS = args.kls
    if not Path(KLS).is_file():
        sys.exit(f"dockerfile_test: no kls binary at {KLS}")
    unittest.main(argv=[sys.argv[0], *rest], verbosity=2)


if __name__ == "__main__":
    main()
