"""Profile handlers: which profiles run for a request, and how their results combine.

``single-profile-handler`` runs the one profile. ``disagg-profile-handler`` shows that a
multi-stage handler needs nothing from the scheduler beyond the round protocol: it runs
``decode`` first, then asks a decider (a plugin named in its parameters) whether a
separate ``prefill`` (or ``encode``) stage is worth it, and tells the decode endpoint
where the prefiller is through a request header.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Mapping

from epp.framework import Plugin, PreRequest, ProfileHandler, register
from epp.framework.plugin import Handle
from epp.framework.scheduling import CycleState, ProfileResult, SchedulingResult
from epp.framework.types import InferenceRequest
from epp.scheduling.profile import SchedulingProfile
from plugins.requestcontrol.data import PREFIX_CACHE_MATCH_INFO_KEY, PrefixCacheMatchInfo

PREFILLER_HEADER = "x-prefiller-host-port"
ENCODER_HEADER = "x-encoder-hosts-ports"


@register("single-profile-handler")
class SingleProfileHandler(ProfileHandler):
    max_profiles = 1

    def pick_profiles(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulingProfile],
                      results: Mapping[str, ProfileResult | None]) -> Mapping[str, SchedulingProfile]:
        return {} if results else profiles

    def process_results(self, cycle: CycleState, request: InferenceRequest,
                        results: Mapping[str, ProfileResult | None]) -> SchedulingResult:
        if len(results) != 1:
            raise ValueError(f"single-profile-handler expects exactly one profile result, got {len(results)}")
        name, result = next(iter(results.items()))
        if result is None:
            raise LookupError(f"failed to run scheduler profile '{name}'")
        return SchedulingResult(profile_results={name: result}, primary_profile=name)


# --- disaggregation ------------------------------------------------------------------------


class StageDecider(Plugin, ABC):
    """Decides, after decode was scheduled, whether a separate stage (prefill/encode) runs."""

    @abstractmethod
    def disaggregate(self, request: InferenceRequest, decode: ProfileResult) -> bool:
        ...


@register("always-disagg-pd-decider")
class AlwaysDisaggDecider(StageDecider):
    def disaggregate(self, request: InferenceRequest, decode: ProfileResult) -> bool:
        return True


@dataclass
class PrefixBasedDeciderParams:
    nonCachedTokens: int = 0

    def validate(self) -> None:
        if self.nonCachedTokens < 0:
            raise ValueError("'nonCachedTokens' must be >= 0")


@register("prefix-based-pd-decider")
class PrefixBasedPDDecider(StageDecider):
    """Prefill separately when the decode endpoint would compute >= nonCachedTokens prompt tokens.

    Prompt tokens are estimated as prompt characters / 4; the cached part is the decode
    target's prefix match (from the approx-prefix-cache producer, 0 without it).
    """

    Params = PrefixBasedDeciderParams

    def disaggregate(self, request: InferenceRequest, decode: ProfileResult) -> bool:
        prompt_tokens = len(request.prefix_input) // 4
        cached = 0
        if decode.targets:
            info = decode.targets[0].data.get(PREFIX_CACHE_MATCH_INFO_KEY)
            if isinstance(info, PrefixCacheMatchInfo):
                cached = info.matched_tokens
        return prompt_tokens - cached >= self.params.nonCachedTokens


@dataclass
class DisaggProfiles:
    decode: str = "decode"
    prefill: str = "prefill"
    encode: str = "encode"


@dataclass
class DisaggDeciders:
    prefill: str = ""
    encode: str = ""


@dataclass
class DisaggParams:
    profiles: DisaggProfiles = field(default_factory=DisaggProfiles)
    deciders: DisaggDeciders = field(default_factory=DisaggDeciders)


@register("disagg-profile-handler", aliases=("pd-profile-handler",))
class DisaggProfileHandler(ProfileHandler, PreRequest):
    """Decode always runs and is primary; prefill/encode run when their decider says so.

    A stage without a decider never runs. A failed optional stage is dropped: the request
    is then served by decode alone.
    """

    Params = DisaggParams

    def __init__(self, name: str | None = None, params: DisaggParams | None = None) -> None:
        super().__init__(name, params)
        self.deciders: dict[str, StageDecider] = {}

    @classmethod
    def create(cls, name: str, params: DisaggParams, handle: Handle) -> "DisaggProfileHandler":
        self = cls(name, params)
        self._resolve(handle, strict=False)
        return self

    async def start(self, handle: Handle) -> None:
        self._resolve(handle, strict=True)

    def _resolve(self, handle: Handle, strict: bool) -> None:
        p: DisaggParams = self.params
        for stage, ref in (("prefill", p.deciders.prefill), ("encode", p.deciders.encode)):
            if not ref or stage in self.deciders:
                continue
            try:
                plugin = handle.plugin(ref)
            except KeyError:
                if strict:
                    raise ValueError(f"plugin '{self.name}': deciders.{stage}: '{ref}' is not a configured plugin") from None
                continue  # may be defined later in the config; resolved in start()
            if not isinstance(plugin, StageDecider):
                raise ValueError(f"deciders.{stage}: plugin '{ref}' is not a decider (type '{plugin.plugin_type}')")
            self.deciders[stage] = plugin

    def pick_profiles(self, cycle: CycleState, request: InferenceRequest, profiles: Mapping[str, SchedulingProfile],
                      results: Mapping[str, ProfileResult | None]) -> Mapping[str, SchedulingProfile]:
        p: DisaggParams = self.params
        decode = p.profiles.decode
        if decode not in results:
            profile = profiles.get(decode)
            return {decode: profile} if profile is not None else {}
        decode_result = results[decode]
        if decode_result is None:
            return {}
        picked: dict[str, SchedulingProfile] = {}
        for stage, profile_name in (("prefill", p.profiles.prefill), ("encode", p.profiles.encode)):
            decider = self.deciders.get(stage)
            profile = profiles.get(profile_name)
            if decider is None or profile is None or profile_name in results:
                continue
            if decider.disaggregate(request, decode_result):
                picked[profile_name] = profile
        return picked

    def process_results(self, cycle: CycleState, request: InferenceRequest,
                        results: Mapping[str, ProfileResult | None]) -> SchedulingResult:
        decode = self.params.profiles.decode
        if results.get(decode) is None:
            raise LookupError(f"failed to run scheduler profile '{decode}'")
        kept = {k: v for k, v in results.items() if v is not None}
        return SchedulingResult(profile_results=kept, primary_profile=decode)

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        p: DisaggParams = self.params
        prefill = result.profile_results.get(p.profiles.prefill)
        if prefill is not None and prefill.targets:
            request.added_headers[PREFILLER_HEADER] = prefill.targets[0].key
        encode = result.profile_results.get(p.profiles.encode)
        if encode is not None and encode.targets:
            request.added_headers[ENCODER_HEADER] = ",".join(t.key for t in encode.targets)
