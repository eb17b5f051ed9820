"""
deploy/cloudformation/pyflock-cluster.yaml: cfn-lint finds no error and no warning; the
template's security promises (tag-scoped IAM, no port open to the world, IMDSv2, ARNs in
every partition, nothing secret in UserData) read from the template; and the stack is
created on ``moto_server``'s CloudFormation, whose resources, IAM conditions and
security-group rules are checked as moto made them.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from cfnlint.api import ManualArgs, lint, lint_file
from cfnlint.decode import decode_str

from tests.harness.processes import free_port, script_path
from tests.harness.sim_hosts import user_data

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "cloudformation" / "pyflock-cluster.yaml"

#: The ports members reach each other on (agent channel, peers, joins) and the API port.
MEMBER_PORTS = {4523, 4524, 4525, 4526}


def template() -> dict:
    """The template, with the short forms (``!Ref``) as their long forms (``Ref``)."""
    decoded, problems = decode_str(TEMPLATE.read_text())
    assert not problems, problems
    return json.loads(json.dumps(decoded))


def statements(role: str) -> dict:
    """The statements of ``role``'s inline policy, by Sid."""
    policy = template()["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"]
    return {s["Sid"]: s for s in policy["Statement"]}


def test_cfn_lint_finds_nothing():
    """cfn-lint reports no error, warning or note on the template."""
    matches = lint_file(TEMPLATE, config=ManualArgs())
    assert [f"{m.rule.id} {m.message} (line {m.linenumber})" for m in matches] == []


def test_cfn_lint_reports_warnings():
    """The same cfn-lint call reports a warning (an unused parameter), so the test above
    would see one in the template."""
    text = TEMPLATE.read_text().replace(
        "Parameters:\n", "Parameters:\n  NeverUsed:\n    Type: String\n    Default: x\n", 1)
    assert "W2001" in {m.rule.id for m in lint(text, config=ManualArgs())}


def test_nothing_open_to_the_world():
    """Only the API and SSH are reachable from outside, and only from AllowedCidr; the
    member ports only from the cluster's own security group."""
    resources = template()["Resources"]
    group = resources["ClusterSecurityGroup"]["Properties"]
    assert sorted((r["FromPort"], r["ToPort"], r["CidrIp"]) for r in group["SecurityGroupIngress"]) \
        == [(22, 22, {"Ref": "AllowedCidr"}), (4523, 4523, {"Ref": "AllowedCidr"})]
    self_rules = {r["Properties"]["FromPort"]: r["Properties"]
                  for r in resources.values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"}
    assert set(self_rules) == MEMBER_PORTS
    for rule in self_rules.values():
        assert rule["SourceSecurityGroupId"] == rule["GroupId"] == {"Ref": "ClusterSecurityGroup"}
        assert rule["FromPort"] == rule["ToPort"]
    assert "0.0.0.0/0" not in json.dumps([group, *self_rules.values()])
    assert "Default" not in template()["Parameters"]["AllowedCidr"]


def test_agent_role_scoped_by_cluster_tag():
    """Agents create volumes only tagged with this cluster, tag only on create (or mark
    their own node tags), and attach, detach and delete only this cluster's volumes and
    instances."""
    cluster = {"Fn::Select": [2, {"Fn::Split": ["/", {"Ref": "AWS::StackId"}]}]}
    found = statements("AgentRole")
    assert found["CreateClusterVolumes"]["Condition"] == {
        "StringEquals": {"aws:RequestTag/pyflock-cluster": cluster}}
    assert found["TagOnCreate"]["Condition"] == {
        "StringEquals": {"ec2:CreateAction": "CreateVolume"}}
    assert found["MarkClusterVolumes"]["Condition"]["ForAllValues:StringEquals"] == {
        "aws:TagKeys": ["pyflock-node", "pyflock-instance", "pyflock-fsck"]}
    for sid in ("MarkClusterVolumes", "AttachClusterVolumesToClusterInstances",
                "DeleteClusterVolumes"):
        assert found[sid]["Condition"]["StringEquals"] == {
            "ec2:ResourceTag/pyflock-cluster": cluster}
    unconditioned = {a for s in found.values() if "Condition" not in s
                     for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert unconditioned == {"ec2:DescribeVolumes", "ec2:DescribeInstances",
                             "ec2:DescribeAvailabilityZones", "ssm:GetParameter",
                             "cloudformation:SignalResource"}
    tags = template()["Resources"]["AgentLaunchTemplate"]["Properties"]["LaunchTemplateData"][
        "TagSpecifications"][0]["Tags"]
    assert {"Key": "pyflock-cluster", "Value": cluster} in tags


def test_parameters_only_under_the_stack():
    """Both roles reach SSM only under /pyflock/<stack>/; only the control node writes."""
    path = ("arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:"
            "parameter/pyflock/${AWS::StackName}/*")
    control, agent = statements("ControlRole"), statements("AgentRole")
    assert control["ClusterParameters"]["Resource"] == {"Fn::Sub": path}
    assert control["ClusterParameters"]["Action"] == ["ssm:PutParameter", "ssm:GetParameter"]
    assert agent["ReadClusterParameters"] == {
        "Sid": "ReadClusterParameters", "Effect": "Allow", "Action": "ssm:GetParameter",
        "Resource": {"Fn::Sub": path}}


def test_every_arn_names_the_partition():
    """No ARN in the template hard-codes ``arn:aws:``."""
    text = TEMPLATE.read_text()
    assert "arn:aws:" not in text
    assert len(re.findall(r"arn:\$\{AWS::Partition\}", text)) >= 8


def test_nodes_require_imdsv2_and_signal():
    """Both launch templates require IMDSv2 tokens; the control node and the agent group
    complete only on signals (one, and one per agent)."""
    resources = template()["Resources"]
    for name in ("ControlLaunchTemplate", "AgentLaunchTemplate"):
        options = resources[name]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
        assert options["HttpTokens"] == "required"
    assert resources["ControlInstance"]["CreationPolicy"]["ResourceSignal"]["Count"] == 1
    assert resources["AgentGroup"]["CreationPolicy"]["ResourceSignal"]["Count"] == {
        "Ref": "AgentCount"}
    assert resources["AgentGroup"]["DependsOn"] == "ControlInstance"


def test_control_data_survives_the_instance():
    """The control node's data volume is snapshotted on delete and replace, encrypted,
    and attached to the control node at launch."""
    volume = template()["Resources"]["ControlDataVolume"]
    assert volume["DeletionPolicy"] == volume["UpdateReplacePolicy"] == "Snapshot"
    assert volume["Properties"]["Encrypted"] is True
    assert template()["Resources"]["ControlInstance"]["Properties"]["Volumes"] == [
        {"Device": "/dev/sdf", "VolumeId": {"Ref": "ControlDataVolume"}}]


def test_user_data_holds_no_secret():
    """The UserData only fetches the scripts and runs the bootstrap: no key, token or
    password, and the AMI comes from the Debian 12 public parameter."""
    resources = template()["Resources"]
    for name in ("ControlLaunchTemplate", "AgentLaunchTemplate"):
        sub = resources[name]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
        script = sub[0] if isinstance(sub, list) else sub
        commands = "\n".join(line for line in script.splitlines()
                             if not line.lstrip().startswith("#"))
        assert "bootstrap.sh" in commands
        assert not re.search(r"(?i)secret|password|aws_access|--token|BEGIN", commands)
    assert template()["Parameters"]["ImageId"]["Default"] == \
        "/aws/service/debian/release/12/latest/amd64"


@pytest.fixture
def moto_server(tmp_path):
    """A ``moto_server`` on 127.0.0.1 for the test, stopped after it; its endpoint URL."""
    port = free_port("127.0.0.1")
    log = (tmp_path / "moto.log").open("w")
    process = subprocess.Popen([script_path("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto_server did not start: "
                                         f"{(tmp_path / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def boto_client(service: str, url: str):
    """A boto3 client of ``service`` talking to moto."""
    import boto3
    return boto3.client(service, endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def role_statements(iam, role: str, policy: str) -> list[dict]:
    """The statements of ``role``'s inline ``policy`` as IAM keeps them."""
    document = iam.get_role_policy(RoleName=role, PolicyName=policy)["PolicyDocument"]
    if isinstance(document, str):  # moto keeps a CloudFormation-made policy as Python text
        document = ast.literal_eval(urllib.parse.unquote(document))
    return document["Statement"]


def test_software_sources_are_required():
    """Where the nodes get pyflock and its scripts has no default: the user names a
    release of their own, never a package or repository that is not there."""
    parameters = template()["Parameters"]
    for name in ("PyflockSource", "ScriptsUrl"):
        assert "Default" not in parameters[name]
        assert parameters[name]["MinLength"] == 1


def test_user_data_fetches_scripts_then_bootstraps():
    """Each launch template's UserData, its variables filled in, fetches the deploy
    scripts from ScriptsUrl and then runs the bootstrap of its role from them."""
    values = {"AWS::StackName": "flock", "AWS::Region": "eu-west-1", "ClusterUuid": "u",
              "ScriptsUrl": "https://example.com/d", "PyflockSource": "pyflock.whl",
              "ControlDataVolume": "vol-1"}
    for role in ("control", "agent"):
        text = user_data(role, values)
        assert '"https://example.com/d/$f"' in text and "${" not in text
        fetch, run = text.index("curl "), text.index(f"exec bash cloudformation/bootstrap.sh {role} ")
        assert fetch < run
        assert "--from 'pyflock.whl'" in text


def create_stack(url: str) -> tuple[dict, dict]:
    """Create the stack on moto (the AMI from a test SSM parameter) and return its
    resources by logical id (physical ids)."""
    ec2, ssm, cloudformation = (boto_client(s, url) for s in ("ec2", "ssm", "cloudformation"))
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ssm.put_parameter(Name="/test/debian-12", Value=image, Type="String",
                      DataType="aws:ec2:image")
    body = template()
    # moto resolves an SSM-typed parameter's default even when a value is given, and it
    # knows no Debian public parameter: point the default at the test's parameter too.
    body["Parameters"]["ImageId"]["Default"] = "/test/debian-12"
    cloudformation.create_stack(
        StackName="flock", TemplateBody=json.dumps(body), Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": "AllowedCidr", "ParameterValue": "203.0.113.0/24"},
                    {"ParameterKey": "ImageId", "ParameterValue": "/test/debian-12"},
                    {"ParameterKey": "PyflockSource",
                     "ParameterValue": "https://example.com/pyflock-0.1.0-py3-none-any.whl"},
                    {"ParameterKey": "ScriptsUrl",
                     "ParameterValue": "https://example.com/pyflock-0.1.0/deploy"},
                    {"ParameterKey": "AgentCount", "ParameterValue": "3"}])
    stack = cloudformation.describe_stacks(StackName="flock")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack
    return stack, {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in
                   cloudformation.list_stack_resources(StackName="flock")["StackResourceSummaries"]}


@pytest.mark.integration
def test_stack_created_on_moto(moto_server):
    """On moto the stack creates its network, the security group with the API and SSH
    open to AllowedCidr only and the member ports to itself, both roles with their
    tag-scoped policies, the control volume in the control node's zone, and
    the agent group of the size asked for."""
    stack, resources = create_stack(moto_server)
    ec2 = boto_client("ec2", moto_server)
    group = ec2.describe_security_groups(GroupIds=[resources["ClusterSecurityGroup"]])[
        "SecurityGroups"][0]
    from_cidr = {(p["FromPort"], r["CidrIp"]) for p in group["IpPermissions"]
                 for r in p["IpRanges"]}
    from_members = {p["FromPort"] for p in group["IpPermissions"]
                    for g in p["UserIdGroupPairs"] if g["GroupId"] == group["GroupId"]}
    assert from_cidr == {(22, "203.0.113.0/24"), (4523, "203.0.113.0/24")}
    assert from_members == MEMBER_PORTS
    assert group["VpcId"] == resources["Vpc"]

    cluster = stack["StackId"].split("/")[2]
    iam = boto_client("iam", moto_server)
    found = {s["Sid"]: s for s in role_statements(iam, resources["AgentRole"], "pyflock-agent")}
    assert found["CreateClusterVolumes"]["Condition"] == {
        "StringEquals": {"aws:RequestTag/pyflock-cluster": cluster}}
    assert found["DeleteClusterVolumes"]["Condition"] == {
        "StringEquals": {"ec2:ResourceTag/pyflock-cluster": cluster}}
    assert found["ReadClusterParameters"]["Resource"] == \
        "arn:aws:ssm:us-east-1:123456789012:parameter/pyflock/flock/*"
    control = role_statements(iam, resources["ControlRole"], "pyflock-control")
    assert control[1]["Resource"] == stack["StackId"]

    volume = ec2.describe_volumes(VolumeIds=[resources["ControlDataVolume"]])["Volumes"][0]
    assert (volume["Size"], volume["AvailabilityZone"]) == (8, "us-east-1a")  # moto ignores Encrypted
    instance = ec2.describe_instances(InstanceIds=[resources["ControlInstance"]])[
        "Reservations"][0]["Instances"][0]
    assert instance["SubnetId"] == resources["PublicSubnet"]
    assert instance["Placement"]["AvailabilityZone"] == volume["AvailabilityZone"]

    groups = boto_client("autoscaling", moto_server).describe_auto_scaling_groups(
        AutoScalingGroupNames=[resources["AgentGroup"]])["AutoScalingGroups"]
    assert (groups[0]["MinSize"], groups[0]["DesiredCapacity"], groups[0]["MaxSize"]) == (3, 3, 10)
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    assert outputs["JoinTokenParameter"] == "/pyflock/flock/join-token"
    assert outputs["ClusterUuid"] == cluster
