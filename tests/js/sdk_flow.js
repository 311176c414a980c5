// Drives the official novita-sdk (3.1.3) against a live server: submit img2img and txt2img with hires fix, poll,
// list models.
// Usage: node sdk_flow.js <baseUrl> <apiKey> <modelName> <imageBase64File>
const { NovitaSDK, TaskStatus } = require("novita-sdk");
const fs = require("fs");

async function main() {
  const [baseUrl, key, model, imageFile] = process.argv.slice(2);
  const sdk = new NovitaSDK(key);
  sdk.setBaseUrl(baseUrl);
  const image = fs.readFileSync(imageFile, "utf8");
  const submitted = await sdk.img2Img({
    request: {
      model_name: model, image_base64: image, prompt: "a lighthouse", width: 128, height: 128,
      image_num: 1, steps: 4, seed: 7, guidance_scale: 7, sampler_name: "Euler a", strength: 0.6,
    },
  });
  const progress = await waitFor(sdk, submitted.task_id);
  const txt2img = await sdk.txt2Img({
    request: {
      model_name: model, prompt: "a lighthouse at dusk", width: 128, height: 128, image_num: 1, steps: 4, seed: 8,
      guidance_scale: 7, sampler_name: "Euler a",
      hires_fix: { target_width: 192, target_height: 192, strength: 0.5, upscaler: "Latent" },
    },
  });
  const txt2imgProgress = await waitFor(sdk, txt2img.task_id);
  const models = await sdk.getModels({ filter: { types: "checkpoint" }, pagination: { limit: 10, cursor: "c_0" } });
  let error = null;
  try {
    await sdk.progress({ task_id: "does-not-exist" });
  } catch (e) {
    error = { code: e.code, reason: e.reason, msg: e.msg };
  }
  console.log(JSON.stringify({ task_id: submitted.task_id, progress, txt2imgProgress, models, error }));
}

async function waitFor(sdk, taskId) {
  let progress;
  for (let i = 0; i < 600; i++) {
    progress = await sdk.progress({ task_id: taskId });
    if (progress.task.status === TaskStatus.SUCCEED || progress.task.status === TaskStatus.FAILED) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  return progress;
}

main().catch((e) => {
  console.error(JSON.stringify({ fatal: String(e), code: e.code, reason: e.reason, msg: e.msg }));
  process.exit(1);
});
