"""EndpointPickerConfig texts shared by tests that start an EPP."""

# Random picks over every schedulable endpoint: tests that count where requests went, or that
# must not depend on load-aware scoring.
RANDOM_PICKER = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"""
